"""`chestxray ensemble ROOT --models A B ... --out ENS`: average bundles into one bundle."""

from __future__ import annotations

import argparse

from chestxray.commands._common import add_dataset_args, dataset_options
from chestxray.data.index import TUNING_SPLITS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble",
        help="average several bundles into one, thresholds re-tuned on validation",
        description="Members must share label order and input size. The ensemble's "
        "thresholds are tuned on --split of ROOT: use the validation carve the "
        "members were trained with (same --val-fraction and --split-seed).",
    )
    p.add_argument(
        "root", help="dataset whose split tunes the thresholds: an NIH root, or NAME:PATH (see `chestxray datasets`)"
    )
    p.add_argument("--models", nargs="+", required=True, help="member bundles (two or more)")
    p.add_argument("--out", required=True, help="the ensemble bundle to write (.safetensors)")
    p.add_argument(
        "--split",
        default="val",
        choices=TUNING_SPLITS,
        help="split that tunes the thresholds (default val; never the test split)",
    )
    p.add_argument("--name", default=None, help="model name stored in the bundle")
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray import NOT_FOR_CLINICAL_USE
    from chestxray.models.bundle import read_bundle_meta
    from chestxray.training.ensemble import make_ensemble

    path = make_ensemble(
        args.models,
        args.root,
        args.out,
        split=args.split,
        name=args.name,
        options=dataset_options(args),
    )
    meta = read_bundle_meta(path)
    macro = next(iter(meta.metrics.values()))["macro"]["auroc"]
    auroc = "undefined" if macro is None else f"{macro:.4f}"
    print(f"ensemble {meta.name} of {len(args.models)} members written to {path}; {args.split} mean AUROC {auroc}")
    print(NOT_FOR_CLINICAL_USE)
    return 0
