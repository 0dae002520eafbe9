"""`chestxray export --onnx OUT.onnx`: a bundle as an ONNX file for torch-free inference,
checked against PyTorch on real radiographs before it is written."""

from __future__ import annotations

import argparse
import json

from chestxray.export.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE, MIN_OPSET
from chestxray.export.quantize import CALIBRATION_METHODS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model bundle to ONNX (dynamic batch, metadata inside), checked against PyTorch",
        description=(
            "Export a model bundle to ONNX for `chestxray predict --backend onnx` and any onnxruntime "
            "user. The graph takes gray float32 (N, 1, S, S) in [0, 1] and returns probabilities; the "
            "bundle's labels, thresholds and preprocessing travel in the file's metadata. After export "
            "the file is run with onnxruntime and PyTorch on real radiographs; if the probabilities "
            "differ by more than --tolerance, the command fails and writes nothing. Needs torch and "
            "the export extra: pip install 'chestxray[torch,export]'."
        ),
    )
    p.add_argument(
        "--model", metavar="BUNDLE", help="model bundle (.safetensors or run folder; default: the packaged model)"
    )
    p.add_argument("--onnx", metavar="OUT.onnx", required=True, help="where to write the ONNX file (atomically)")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset, {MIN_OPSET} or newer (default {DEFAULT_OPSET}, which onnxruntime >= 1.14 runs)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest allowed |p_onnx - p_torch| on the check images (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images or folders to check on (first 8; default: the packaged NIH samples)",
    )
    p.add_argument(
        "--int8", action="store_true", help="write an int8 model (onnxruntime static quantization) instead of float32"
    )
    p.add_argument("--calibration", metavar="DIR", help="real radiographs to calibrate int8 on (with --int8)")
    p.add_argument(
        "--calibration-count",
        type=int,
        default=64,
        metavar="N",
        help="calibrate on a seeded sample of N images (default 64)",
    )
    p.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="how activation ranges are chosen (default minmax)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from chestxray.errors import ChestXrayError
    from chestxray.export.onnx import export_bundle

    if args.calibration and not args.int8:
        raise ChestXrayError("--calibration is only used with --int8")
    check_onnx_out(args.onnx)  # before the export, not after it
    say = (lambda s: print(s, file=sys.stderr)) if args.json else print
    result = export_bundle(
        args.model,
        args.onnx,
        opset=args.opset,
        tolerance=args.tolerance,
        check_images=args.check_images,
        int8=args.int8,
        calibration=args.calibration,
        calibration_count=args.calibration_count,
        calibration_method=args.calibration_method,
        say=say,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "bytes": result.bytes,
                    "opset": result.opset,
                    "quantization": result.quantization,
                    "parity": result.parity.to_dict(),
                    "float_parity": result.float_parity.to_dict() if result.float_parity else None,
                    "seconds": round(result.seconds, 2),
                },
                indent=2,
            )
        )
        return 0
    print(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, opset {result.opset}, dynamic batch, "
        f"{result.quantization}) in {result.seconds:.1f} s"
    )
    if args.int8:
        print(
            "int8 is kept only if it loses at most 0.005 mean AUROC against float32 on held-out images: "
            "python benchmarks/inference.py --model BUNDLE --compare-auroc NIH_ROOT"
        )
    print(f"use it without torch: chestxray predict --backend onnx --model {result.path} IMAGE")
    return 0


def check_onnx_out(out: str) -> None:
    from pathlib import Path

    from chestxray.errors import ChestXrayError
    from chestxray.io import check_writable

    if Path(out).is_dir():
        raise ChestXrayError(f"--onnx {out}: is a folder; name the file, e.g. {Path(out) / 'model.onnx'}")
    check_writable(out)
