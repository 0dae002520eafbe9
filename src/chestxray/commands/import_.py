"""`chestxray import xrv NAME --out BUNDLE`: torchxrayvision's published weights as a safe bundle.

(The module is `import_` because `import` is a Python keyword; the command is `import`.)
"""

from __future__ import annotations

import argparse
import sys

from chestxray.errors import ChestXrayError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chestxray.models.xrv_weights import XRV_WEIGHTS

    p = sub.add_parser(
        "import",
        help="convert published pretrained chest X-ray weights (torchxrayvision) into a bundle",
        description="Converts torchxrayvision's weights once into a bundle (safetensors + JSON) that every "
        "command reads: their architecture, their input scaling and centre crop, their output names "
        "(untrained slots dropped, names in this project's vocabulary), their operating thresholds and "
        "the file's provenance. With a network the file is downloaded from the address torchxrayvision "
        "publishes; offline, download it elsewhere and pass --file.",
    )
    p.add_argument("source", choices=["xrv"], help="xrv: torchxrayvision (github.com/mlmed/torchxrayvision)")
    p.add_argument("name", metavar="NAME", help=f"weights name: {', '.join(XRV_WEIGHTS)}")
    p.add_argument("--out", required=True, help="bundle to write: FILE.safetensors, or a folder (model.safetensors)")
    p.add_argument("--file", metavar="PATH", help="the weights file, already downloaded (no network needed)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow reading a pickled whole model (their DenseNet files) through a restricted unpickler",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.models.xrv_import import import_xrv

    if args.source != "xrv":  # pragma: no cover - argparse choices
        raise ChestXrayError(f"unknown source {args.source!r}")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    path, meta = import_xrv(args.name, args.out, file=args.file, trust_pickle=args.trust_pickle, say=say)
    src = meta.training["source"]
    print(f"wrote {path}: {meta.architecture}, {meta.preprocessing.size} px, {len(meta.labels)} outputs")
    print(f"  labels: {', '.join(meta.labels)}")
    if src["outputs_dropped"]:
        print(f"  dropped (untrained in these weights): {', '.join(src['outputs_dropped'])}")
    print(f"  thresholds: torchxrayvision op_threshs; sha256 {src['sha256']}")
    return 0
