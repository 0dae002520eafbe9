"""`chestxray` command line: a parser factory and `main(argv)`; each subcommand lives in
`chestxray.commands.<name>` with `add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from chestxray import NOT_FOR_CLINICAL_USE, __version__
from chestxray.errors import ChestXrayError

# Module names; `import_` holds the `import` command (a Python keyword cannot name a module).
COMMANDS = (
    "info",
    "datasets",
    "prepare",
    "train",
    "runs",
    "evaluate",
    "tune",
    "ensemble",
    "predict",
    "report",
    "export",
    "serve",
    "listen",
    "dicomweb",
    "models",
    "import_",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` (a command name) just that command's: importing every
    command's module would slow every run's start."""
    parser = argparse.ArgumentParser(
        prog="chestxray",
        description="Chest X-ray analyzer for the 14 NIH ChestX-ray14 findings. " + NOT_FOR_CLINICAL_USE,
    )
    parser.add_argument("--version", action="version", version=f"chestxray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if only is not None and name.rstrip("_") != only:
            continue
        try:
            module = importlib.import_module(f"chestxray.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("chestxray.commands"):
                continue  # command not part of this build
            raise
        module.add_parser(sub)
    return parser


def requested_command(argv: Sequence[str]) -> str | None:
    """The known command named on the command line (the first word not an option), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in {name.rstrip("_") for name in COMMANDS} else None
    return None


# The extra of pyproject.toml that installs each optional module a command may import.
EXTRAS = {
    "torch": ("torch", "torch"),
    "torchvision": ("torchvision", "torch"),
    "safetensors": ("safetensors", "torch"),
    "yaml": ("pyyaml", "torch"),
    "pandas": ("pandas", "data"),
    "sklearn": ("scikit-learn", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "scipy": ("scipy", "eval"),
    "onnxruntime": ("onnxruntime", "infer"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "timm": ("timm", "timm"),
    "pyarrow": ("pyarrow", "archive"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for a missing optional module, or None."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    dist, extra = EXTRAS[top]
    return f"this command needs {dist}, which is not installed: pip install 'chestxray[{extra}]'"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(requested_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except ChestXrayError as exc:
        from chestxray.commands._common import flag_message

        print(f"chestxray {args.command}: error: {flag_message(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        if hint is None:
            raise
        print(f"chestxray {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
