"""`chestxray evaluate [--model BUNDLE] ROOT`: honest metrics of a bundle on a split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chestxray.commands._common import (
    ROOT_HELP,
    add_dataset_args,
    add_model_args,
    dataset_options,
    non_negative_int,
    positive_int,
    require_modules,
)
from chestxray.data.index import ALL_SPLITS

# Scoring needs the data layer and the metric and plotting libraries, not torch (an .onnx model runs on onnxruntime).
EVALUATE_NEEDS = {"pandas": "pandas", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "scipy": "scipy"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-class AUROC/AUPRC/F1 with patient-bootstrap CIs, curves, report")
    p.add_argument("root", help=ROOT_HELP + "; findings shared with the model are scored")
    p.add_argument(
        "--labels",
        default=None,
        metavar="google2019:FILE",
        help="score an NIH root against other labels: google2019:FILE, Google's 2019 expert labels "
        "(google2019_nih-chest-xray-labels.csv[.gz]); --split test or val is Google's own",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=ALL_SPLITS,
        help="split to evaluate on (default test); all: every labelled image, e.g. a whole external set",
    )
    p.add_argument("--out", default=None, help="output folder (default: eval-<split>)")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap replicates, resampling patients, for the 95%% intervals (default 1000; 0: no intervals)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--by",
        default=None,
        metavar="COLS",
        help="subgroups: any of sex,age,view (age bands <40, 40-59, >=60), or none; "
        "default: every one the labels file has",
    )
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument(
        "--boxes",
        nargs="?",
        const="",
        default=None,
        metavar="CSV",
        help="also score Grad-CAM localization against radiologist boxes (default CSV: ROOT/BBox_List_2017.csv; "
        "for vindr: its train.csv boxes)",
    )
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from chestxray import NOT_FOR_CLINICAL_USE
    from chestxray.commands._common import resolve_device_arg
    from chestxray.data.datasets import open_dataset
    from chestxray.errors import DatasetError
    from chestxray.evaluation.evaluate import mapping_lines, run_evaluation, scored_phrase, split_phrase
    from chestxray.evaluation.subgroups import parse_by
    from chestxray.inference.predict import Analyzer, resolve_backend
    from chestxray.io import atomic_write_text, check_output_folder

    require_modules("evaluate", EVALUATE_NEEDS)
    out = Path(args.out or f"eval-{args.split}")
    check_output_folder(out)  # before the work, whose results would be lost
    try:
        by = parse_by(args.by, ("sex", "age", "view")) if args.by is not None else None
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    backend = resolve_backend(args.model, args.backend)
    device = resolve_device_arg(args.device, backend)
    analyzer = Analyzer.load(args.model, backend=backend, device=device, batch_size=args.batch_size)
    index = open_dataset(args.root, dataset_options(args))
    if args.labels:
        kind, _, file = args.labels.partition(":")
        if kind != "google2019" or not file:
            raise DatasetError(f"--labels {args.labels!r}: expected google2019:FILE")
        if index.dataset != "nih":
            raise DatasetError("--labels google2019:FILE applies to an NIH root")
        from chestxray.data.datasets.google2019 import with_google_labels

        index = with_google_labels(index, Path(file))
    result = run_evaluation(
        analyzer, index, args.split, out, n_boot=args.bootstrap, seed=args.seed, progress=True, by=by
    )
    for line in mapping_lines(result):
        print(line)
    m = result["macro"]
    ci = m.get("auroc_ci") or [None, None]
    print(
        f"{analyzer.name} on the {split_phrase(args.split)}: {scored_phrase(result)}, {result['n_patients']} patients"
    )
    macro = "undefined (no finding has positives and negatives here)" if m["auroc"] is None else f"{m['auroc']:.4f}"
    print(
        f"macro AUROC {macro}"
        + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci[0] is not None else "")
        + f"  element-wise accuracy {result['elementwise_accuracy']:.4f} "
        f"(all-negative {result['all_negative_accuracy']:.4f})"
    )
    for name, e in result["per_class"].items():
        auc = "undefined" if e["auroc"] is None else f"{e['auroc']:.3f}"
        n = f"{e['support']}" + (f" of {e['labelled']} labelled" if "labelled" in e else "")  # blanks left out
        print(f"  {name:<19} n+={n:<4} AUROC {auc}")
    cal = result["calibration"]
    print(
        f"calibration ({cal['calibrator'] or 'none in the bundle'}): macro Brier {_num(cal['macro']['brier'])}, "
        f"macro ECE {_num(cal['macro']['ece'])} ({cal['binning']})"
    )
    flagged = [
        f"{name} {column}={g}"
        for column, groups in result.get("subgroups", {}).get("columns", {}).items()
        for g, entry in groups.items()
        if isinstance(entry, dict) and "per_class" in entry
        for name, e in entry["per_class"].items()
        if e["below"]
    ]
    missing = [
        f"{c} ({g['missing']})" for c, g in result.get("subgroups", {}).get("columns", {}).items() if "missing" in g
    ]
    if missing:
        print("subgroups not evaluated: " + "; ".join(missing))
    if len(missing) < len(result.get("subgroups", {}).get("columns", {})):
        print(
            f"subgroups: {len(flagged)} finding/subgroup pairs whose CI lies below the overall AUROC"
            + (f": {', '.join(flagged)}" if flagged else "")
        )
    if args.boxes is not None:
        from chestxray.evaluation.localization import localization_markdown, score_localization

        if index.dataset == "vindr" and not args.boxes:
            from chestxray.evaluation.localization import vindr_box_entries

            # The radiologists' boxes of train.csv, in each DICOM's own pixel frame.
            csv = Path(index.labels_file)  # type: ignore[attr-defined]
            loc = score_localization(
                analyzer,
                index,
                csv,
                split=args.split,
                seed=args.seed,
                entries=vindr_box_entries(index.root),
                box_frame=None,
            )
        else:
            csv = Path(args.boxes) if args.boxes else Path(index.root) / "BBox_List_2017.csv"
            if not csv.is_file():
                raise DatasetError(f"--boxes: {csv} not found")
            loc = score_localization(analyzer, index, csv, split=args.split, seed=args.seed)
        result["localization"] = loc
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        md = (out / "report.md").read_text() + "\n" + localization_markdown(loc)
        atomic_write_text(out / "report.md", md)
        print(localization_markdown(loc))
    if "threshold_warning" in result:
        print(f"chestxray evaluate: warning: {result['threshold_warning']['message']}", file=sys.stderr)
    print(f"wrote {out}/metrics.json, report.md, roc_curves.png, pr_curves.png, reliability.png")
    print(NOT_FOR_CLINICAL_USE)
    return 0


def _num(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4f}"
