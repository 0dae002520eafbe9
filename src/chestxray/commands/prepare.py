"""`chestxray prepare ROOT`: decode every image once into a uint8 cache for training."""

from __future__ import annotations

import argparse
import os
import sys

from chestxray.commands._common import ROOT_HELP, add_dataset_args, dataset_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chestxray.data.cache import DEFAULT_CACHE_SIZE

    p = sub.add_parser("prepare", help="decode and resize every image once into a uint8 cache")
    p.add_argument("root", help=ROOT_HELP)
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder (default: $CHESTXRAY_CACHE/<root>-<hash>, else "
        "~/.cache/chestxray/<root>-<hash>; never inside the dataset root)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=DEFAULT_CACHE_SIZE,
        help=f"side in pixels; training reads the cache whose size equals its --image-size "
        f"(default {DEFAULT_CACHE_SIZE})",
    )
    p.add_argument(
        "--crop",
        choices=("none", "center"),
        default="none",
        help="none: whole images resized (default); center: a centred square first, as models "
        "imported from torchxrayvision predict (training with --init such a bundle reads this cache)",
    )
    cores = os.cpu_count() or 1
    p.add_argument(
        "--workers", type=int, default=cores, help=f"decoding processes (default {cores}: the number of CPU cores)"
    )
    add_dataset_args(p)
    p.set_defaults(run=run)


MAX_LISTED = 20  # failures printed; all of them are in failed.json


def run(args: argparse.Namespace) -> int:
    from chestxray.data.cache import default_cache_dir, prepare_cache
    from chestxray.data.datasets import open_dataset, parse_root

    index = open_dataset(args.root, dataset_options(args))
    if index.skipped_missing:
        print(f"skipped {index.skipped_missing:,} listed images that are missing (--allow-missing)")
    cache = args.cache or default_cache_dir(parse_root(args.root)[1])
    report = prepare_cache(
        list(index.iter_paths()),
        cache,
        size=args.size,
        workers=args.workers,
        progress=sys.stderr.isatty(),
        crop=args.crop,
    )
    print(
        f"cache {report.cache_dir}: {report.total - len(report.failed):,} of {report.total:,} images ready "
        f"({report.decoded:,} decoded now, {report.skipped:,} already done)"
    )
    if report.failed:
        print(
            f"{len(report.failed):,} files could not be read (fix them, or delete them and "
            f"use --allow-missing, then run prepare again):",
            file=sys.stderr,
        )
        paths = dict(index.iter_paths())
        for name, reason in list(report.failed.items())[:MAX_LISTED]:
            print(f"  {paths.get(name, name)}: {reason}", file=sys.stderr)
        if len(report.failed) > MAX_LISTED:
            print(
                f"  ... and {len(report.failed) - MAX_LISTED:,} more, all listed in {report.cache_dir / 'failed.json'}",
                file=sys.stderr,
            )
        return 1
    return 0
