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
    "models",
    "import_",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chestxray",
        description="Chest X-ray analyzer for the 14 NIH ChestX-ray14 findings. " + NOT_FOR_CLINICAL_USE,
    )
    parser.add_argument("--version", action="version", version=f"chestxray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"chestxray.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("chestxray.commands"):
                continue  # command not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except ChestXrayError as exc:
        print(f"chestxray {args.command}: error: {exc}", file=sys.stderr)
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
