"""`chestxray tune --model BUNDLE ROOT --split val --out NEW`: refit calibration and
thresholds (and optionally the input check) on a site's own labelled data; weights unchanged."""

from __future__ import annotations

import argparse
import os

from chestxray.commands._common import add_dataset_args, add_device_arg, dataset_options
from chestxray.data.index import ALL_SPLITS


def policy_arg(text: str) -> str:
    from chestxray.evaluation.thresholds import parse_policy

    try:
        parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """--calibrate and --threshold-policy: shared by tune and train."""
    from chestxray.evaluation.thresholds import POLICY_HELP
    from chestxray.evaluation.tune import DEFAULT_CALIBRATION, DEFAULT_POLICY
    from chestxray.inference.calibration import METHODS

    p.add_argument(
        "--calibrate",
        choices=METHODS,
        default=DEFAULT_CALIBRATION,
        help=f"per-finding calibrator fitted on the tuning split (default {DEFAULT_CALIBRATION}, chosen by "
        "measurement; see MODEL_CARD.md)",
    )
    p.add_argument(
        "--threshold-policy",
        type=policy_arg,
        default=DEFAULT_POLICY,
        metavar="POLICY",
        help=f"operating point: {POLICY_HELP}; default {DEFAULT_POLICY}",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="refit calibration and thresholds of a bundle on your own labelled data (weights unchanged)",
        description="Reads ROOT's SPLIT through the bundle, fits a per-finding calibrator and the thresholds of "
        "a named policy on it, and writes a new bundle whose JSON header records how. The weights are copied "
        "unchanged. With --evaluate-split, refuses tuning data that shares patients with that split.",
    )
    p.add_argument("root", help="labelled dataset root (any layout the data layer reads)")
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="bundle (.safetensors) or exported .onnx file to re-tune (default: the bundled model; its ONNX "
        "twin when torch is not installed)",
    )
    p.add_argument(
        "--split",
        default="val",
        choices=ALL_SPLITS,
        help="tuning split (default val; all: every labelled image, e.g. a site's own set)",
    )
    p.add_argument(
        "--out", required=True, metavar="NEW_MODEL", help="the new file (.safetensors, or .onnx for an ONNX model)"
    )
    add_calibration_args(p)
    p.add_argument(
        "--input-check-split",
        default=None,
        choices=["train", "val", "test", "all"],
        help="also refit the input check: statistics of this split's features, cut-off from the tuning split",
    )
    p.add_argument(
        "--evaluate-split", default=None, choices=["train", "val", "test"], help="the split you will evaluate on"
    )
    p.add_argument("--evaluate-root", default=None, help="its dataset root (default ROOT)")
    add_device_arg(p)
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray import NOT_FOR_CLINICAL_USE
    from chestxray.commands._common import require_modules, resolve_device_arg
    from chestxray.data.datasets import open_dataset
    from chestxray.errors import ChestXrayError
    from chestxray.evaluation.tune import retune_bundle
    from chestxray.inference.predict import default_bundle_path, resolve_backend
    from chestxray.io import check_writable

    if os.path.isdir(args.out):
        raise ChestXrayError(f"--out {args.out}: is a folder; name the new model file")
    check_writable(args.out)  # before the work, whose results would be lost
    require_modules("tune", {"pandas": "pandas", "sklearn": "scikit-learn", "scipy": "scipy"})
    backend = resolve_backend(args.model)
    if args.model is not None:
        model = args.model
    elif backend == "onnx":  # no torch: the packaged ONNX model
        from chestxray.inference.onnx_backend import default_onnx_path

        model = default_onnx_path()
    else:
        model = default_bundle_path()
    index = open_dataset(args.root, dataset_options(args))
    eval_index = None
    if args.evaluate_root is not None:
        eval_index = open_dataset(args.evaluate_root, dataset_options(args))
    path, summary = retune_bundle(
        model,
        index,
        args.split,
        args.out,
        policy=args.threshold_policy,
        calibrate=args.calibrate,
        input_check_split=args.input_check_split,
        eval_index=eval_index,
        eval_split=args.evaluate_split,
        device=resolve_device_arg(args.device, backend),
        progress=True,
    )
    op = summary["operating_point"]
    ece = summary["calibration"].get("fit_split_ece_macro", {})
    print(f"tuned on {op['tuned_on']}: calibration {args.calibrate}, policy {op['policy']}")
    if ece:
        print(f"macro ECE on the tuning split: {ece['before']:.4f} before, {ece['after']:.4f} after")
    print(f"{'finding':<19} {'old thr':>8} {'new thr':>8} {'val sens':>8} {'val spec':>8}")
    for lab, new in summary["thresholds"].items():
        e = op["per_finding"][lab]
        sens = "-" if e["sensitivity"] is None else f"{e['sensitivity']:.3f}"
        spec = "-" if e["specificity"] is None else f"{e['specificity']:.3f}"
        print(f"{lab:<19} {summary['previous_thresholds'][lab]:>8.3f} {new:>8.3f} {sens:>8} {spec:>8}")
    if summary["input_check"] and args.input_check_split:
        print(f"input check: cut-off {summary['input_check']['cutoff']:.1f} ({summary['input_check']['cutoff_rule']})")
        o = summary.get("orientation")
        if o and "val_warned" in o:
            print(
                f"orientation check: template of {o['train_images'] - o['train_images_left_out_as_turned']} training "
                f"images, margin {o['margin']}; warns {o['val_warned']} of {o['val_images']} tuning-split images"
            )
    print(f"wrote {path} (weights unchanged). {NOT_FOR_CLINICAL_USE}")
    if backend == "onnx":
        print("an ONNX file re-tuned here is read by this version of chestxray and later (format 2)")
    return 0
