"""`chestxray report ROOT --out DIR`: example predictions vs ground truth, with Grad-CAM."""

from __future__ import annotations

import argparse
import sys

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands._common import (
    ROOT_HELP,
    add_dataset_args,
    add_model_args,
    dataset_options,
    positive_int,
    require_modules,
    resolve_device_arg,
)
from chestxray.data.index import ALL_SPLITS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a grid of random example predictions vs ground truth with Grad-CAM (grid.png, index.html)",
        description="Pick N seeded random images of a split, predict them, and show per image the "
        "radiograph, the true and predicted labels and the Grad-CAM of the most probable "
        "finding. Writes DIR/grid.png, DIR/index.html (self-contained) and "
        "DIR/predictions.json. " + NOT_FOR_CLINICAL_USE,
    )
    p.add_argument("root", help=ROOT_HELP)
    add_model_args(p)
    p.add_argument(
        "--split", choices=ALL_SPLITS, default="test", help="split to draw from (default test; all: every image)"
    )
    p.add_argument("--n", type=positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.commands.evaluate import EVALUATE_NEEDS
    from chestxray.data.datasets import open_dataset
    from chestxray.evaluation.report import NO_CAM, has_grad_cam, write_report
    from chestxray.inference.predict import Analyzer, resolve_backend
    from chestxray.io import check_output_folder

    check_output_folder(args.out)  # before the work, whose results would be lost
    require_modules("report", {k: v for k, v in EVALUATE_NEEDS.items() if k in ("pandas", "matplotlib")})
    backend = resolve_backend(args.model, args.backend)
    analyzer = Analyzer.load(args.model, backend=backend, device=resolve_device_arg(args.device, backend))
    if not has_grad_cam(analyzer):
        print(f"chestxray report: {NO_CAM}", file=sys.stderr)
    index = open_dataset(args.root, dataset_options(args))
    summary = write_report(
        analyzer, index, args.out, split=args.split, n=args.n, seed=args.seed, progress=sys.stderr.isatty()
    )
    print(
        f"report of {summary['images']} images of the {'whole dataset' if args.split == 'all' else args.split + ' split'} "
        f"by model {analyzer.name}: "
        f"{summary['html']} and {summary['grid']}\n{NOT_FOR_CLINICAL_USE}"
    )
    if summary["unreadable"]:
        print(
            f"chestxray report: {summary['unreadable']} of {summary['images']} images could not be read "
            "(marked in the report)",
            file=sys.stderr,
        )
        return 1
    return 0
