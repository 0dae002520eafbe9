"""`chestxray predict` without --cam: the streaming pipeline, its outputs, shards and torchrun.

Kept apart from commands/predict.py (argument parsing, Grad-CAM, the table/json/csv
renderers) so that the bulk machinery does not grow that module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.commands._common import ROOT_HELP, dataset_options, non_negative_int
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.inference.distributed import DistInfo
    from chestxray.inference.inputs import InputFile
    from chestxray.inference.pipeline import Progress
    from chestxray.inference.predict import Analyzer, Prediction

# Collectives wait this long for the slowest rank (its whole shard), not torch's 30 minutes.
DIST_TIMEOUT_S = 7 * 24 * 3600


def add_bulk_args(p: argparse.ArgumentParser) -> None:
    from chestxray.data.index import ALL_SPLITS

    p.add_argument("--from-list", metavar="FILE", help="also predict the paths listed in FILE, one per line")
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="ROOT",
        help=f"also predict the images of a {ROOT_HELP} (read from its index, in its order; frontal views unless "
        "--views says otherwise); may be repeated",
    )
    p.add_argument(
        "--split",
        choices=ALL_SPLITS,
        default=None,
        help="with --dataset: only this split (default all; val is carved as in train/evaluate)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="decoder processes (default: all cores, shared among torchrun ranks on a node; 0: decode in-process)",
    )
    p.add_argument("--shard", metavar="I/N", help="predict only shard I of N (I from 0), e.g. for a job array")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --out run (csv, jsonl, parquet): files already there (same path, size "
        "and mtime) are skipped",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="S",
        help="without a terminal: one progress line every S seconds on stderr (default 30; 0: none)",
    )


def listed_datasets(args: argparse.Namespace) -> list[list[str]]:
    """The image paths of each --dataset root (its split), read once before the model loads
    so that a wrong root fails at once."""
    if args.split is not None and not args.dataset:
        raise ChestXrayError("--split only applies with --dataset ROOT")
    from chestxray.inference.inputs import dataset_paths

    opts = dataset_options(args)
    return [dataset_paths(spec, args.split or "all", opts) for spec in args.dataset]


def check_bulk_args(args: argparse.Namespace) -> None:
    if args.cam and (args.resume or args.format in ("jsonl", "parquet")):
        raise ChestXrayError(
            "--cam writes overlays one image at a time; use --format table, json or csv without --resume"
        )
    if args.resume and not (args.out and args.format in ("csv", "jsonl", "parquet")):
        raise ChestXrayError("--resume needs --out FILE with --format csv, jsonl or parquet")
    if args.format == "parquet" and not args.out:
        raise ChestXrayError("--format parquet needs --out FILE")


def setup(args: argparse.Namespace, device: str) -> tuple["DistInfo", str]:
    """Join torchrun's process group if launched by it; each rank gets its own GPU."""
    from chestxray.inference.distributed import DistInfo, init_distributed, launched_by_torchrun
    from chestxray.inference.pipeline import start_worker_server

    if args.workers != 0 and not args.cam and _may_be_many(args):
        start_worker_server()  # its imports overlap the model load
    if not launched_by_torchrun():
        return DistInfo(), device
    info = init_distributed(device, timeout_s=DIST_TIMEOUT_S)
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    return info, device


def _may_be_many(args: argparse.Namespace) -> bool:
    """More than one batch may come (a folder, a glob, a list): worth starting the workers'
    server early. A few named files are decoded in-process anyway."""
    return (
        bool(args.from_list)
        or sum(len(d) for d in args.listed_datasets) + len(args.paths) > args.batch_size
        or any(os.path.isdir(p) or not os.path.exists(p) for p in args.paths)
    )


def run_bulk(args: argparse.Namespace, analyzer: "Analyzer", info: "DistInfo", render: Callable[..., str]) -> int:
    """`render(predictions, fmt, model_name)`: the table/json/csv text (commands/predict.py)."""
    from chestxray.inference.pipeline import default_workers

    workers = default_workers(info.local_world_size) if args.workers is None else args.workers
    if (
        workers > 0
        and getattr(analyzer.backend, "name", "") == "torch"
        and str(getattr(analyzer.backend, "device", "")) == "cpu"
    ):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as onnxruntime's one thread: the decoder processes have the other cores
        try:
            return _run_bulk(args, analyzer, info, render, workers)
        finally:
            torch.set_num_threads(threads)
    return _run_bulk(args, analyzer, info, render, workers)


def _run_bulk(
    args: argparse.Namespace, analyzer: "Analyzer", info: "DistInfo", render: Callable[..., str], workers: int
) -> int:
    from chestxray.inference.inputs import Shard, count_inputs, iter_inputs
    from chestxray.inference.pipeline import Progress, chunked

    shard = (Shard.parse(args.shard) if args.shard else Shard()).within(Shard(info.rank, info.world_size))
    files = iter_inputs(args.paths, args.from_list, shard, args.listed_datasets)
    want_progress = not args.no_progress
    tty = sys.stderr.isatty()
    # The ETA needs a total: one extra listing pass (names only, no stat).
    total = count_inputs(args.paths, args.from_list, shard, args.listed_datasets) if want_progress else None
    if args.out and args.format in ("csv", "jsonl", "parquet"):
        return _to_file(args, analyzer, info, files, workers, total)
    progress = Progress(total, tty=tty, every_s=args.progress_every, enabled=want_progress and total != 1)
    if args.format in ("csv", "jsonl"):
        from chestxray.inference.outputs import StdoutWriter, to_record

        writer = StdoutWriter(args.format, sys.stdout)
        failed: list[tuple[str, str]] = []
        n = 0
        for batch in chunked(_predict(analyzer, files, workers, args.batch_size, progress), args.batch_size):
            writer.write([to_record(f, p) for f, p in batch])
            failed += [(p.file, p.error) for _, p in batch if p.error]
            n += len(batch)
        progress.close()
        check_any(n, args)
        print(f"model {_label(analyzer)}. {NOT_FOR_CLINICAL_USE}", file=sys.stderr)
        return _report_failures(failed, n)
    predictions = [p for _, p in _predict(analyzer, files, workers, args.batch_size, progress)]
    progress.close()
    check_any(len(predictions), args)
    return emit(args, analyzer, predictions, render)


def emit(
    args: argparse.Namespace, analyzer: "Analyzer", predictions: list["Prediction"], render: Callable[..., str]
) -> int:
    """Write a finished list of predictions (table/json/csv) to --out or stdout, then list the
    unreadable files; the exit status is 1 when there were any."""
    text = render(predictions, args.format, _label(analyzer))
    if args.out:
        from chestxray.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(
            f"wrote {len(predictions)} predictions ({args.format}) to {args.out}; model {_label(analyzer)}. "
            f"{NOT_FOR_CLINICAL_USE}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
        if args.format != "table":
            print(f"model {_label(analyzer)}. {NOT_FOR_CLINICAL_USE}", file=sys.stderr)
    if getattr(args, "cam", None):
        written = sum(len(p.overlays or []) for p in predictions)
        print(f"wrote {written} Grad-CAM overlays to {Path(args.cam).resolve()}", file=sys.stderr)
    return _report_failures([(p.file, p.error) for p in predictions if p.error], len(predictions))


def _predict(
    analyzer: "Analyzer", files: Iterator["InputFile"], workers: int, batch_size: int, progress: "Progress"
) -> Iterator[tuple["InputFile", "Prediction"]]:
    for f, p in analyzer.predict_files(files, workers=workers, batch_size=batch_size):
        progress.update(1, errors=int(not p.ok))
        yield f, p


def _label(analyzer: "Analyzer") -> str:
    """The model as outputs name it: name and variant (e.g. "onnx int8")."""
    return f"{analyzer.name} ({analyzer.variant})"


def check_any(n: int, args: argparse.Namespace) -> None:
    if n == 0:
        from chestxray.data.images import IMAGE_SUFFIXES

        where = ", ".join(list(args.paths) + ([args.from_list] if args.from_list else []) + list(args.dataset))
        raise ChestXrayError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")


def _report_failures(failed: list[tuple[str, str]], n: int, show: int = 20, total_failed: int | None = None) -> int:
    count = len(failed) if total_failed is None else total_failed
    if not count:
        return 0
    print(f"chestxray predict: {count} of {n} files could not be read:", file=sys.stderr)
    for name, error in failed[:show]:
        print(f"  {name}: {error}", file=sys.stderr)
    if count > show:
        print(f"  ... and {count - show} more (see the error column)", file=sys.stderr)
    return 1


def _to_file(
    args: argparse.Namespace,
    analyzer: "Analyzer",
    info: "DistInfo",
    files: Iterator["InputFile"],
    workers: int,
    total: int | None,
) -> int:
    from chestxray.inference.distributed import all_sum, barrier
    from chestxray.inference.outputs import Journal, finalize, journal_path, to_record
    from chestxray.inference.pipeline import Progress, chunked

    out = Path(args.out)
    jpath = journal_path(out, info.rank, info.world_size)
    if (
        args.resume
        and out.exists()
        and not any(journal_path(out, r, info.world_size).exists() for r in range(info.world_size))
    ):
        return _already_complete(out, args.format, files)
    journal = Journal(jpath, resume=args.resume, model_name=analyzer.name)
    todo = (f for f in files if not journal.skip(f))
    left = None if total is None else max(total - len(journal.done), 0)
    progress = Progress(left, tty=sys.stderr.isatty(), every_s=args.progress_every, enabled=not args.no_progress)
    try:
        for batch in chunked(_predict(analyzer, todo, workers, args.batch_size, progress), args.batch_size):
            journal.append([to_record(f, p) for f, p in batch])
    except BaseException:
        journal.abort()  # what is in the journal stays: --resume continues from it
        raise
    progress.close()
    journal.close()
    listed = all_sum(journal.written + len(journal.matched), info)  # also waits for every rank
    parts = [journal_path(out, r, info.world_size) for r in range(info.world_size)]
    if listed == 0:
        barrier(info)
        if info.is_main:
            for part in parts:
                part.unlink(missing_ok=True)
        check_any(0, args)
    errors = 0
    if info.is_main:
        summary = finalize(out, args.format, parts, analyzer.labels)
        if summary.total + summary.duplicates != listed:
            raise ChestXrayError(f"{out}: merged {summary.total} rows for {listed} listed files; rerun with --resume")
        print(
            f"wrote {summary.total} predictions ({args.format}) to {out}; model {_label(analyzer)}. "
            f"{NOT_FOR_CLINICAL_USE}",
            file=sys.stderr,
        )
        errors = summary.errors
        _report_failures(summary.failures, summary.total, total_failed=summary.errors)
    errors = all_sum(errors, info)  # every rank exits alike, after rank 0 has merged
    barrier(info)
    return 1 if errors else 0


def _already_complete(out: Path, fmt: str, files: Iterator["InputFile"]) -> int:
    from chestxray.inference.outputs import complete_output_keys

    keys = complete_output_keys(out, fmt)
    by_path = fmt == "csv"  # a CSV holds no size/mtime columns: matched by path only
    missing = sum(1 for f in files if (f.path if by_path else f.key) not in keys)
    if missing:
        raise ChestXrayError(
            f"{out} is complete but {missing} listed files are not in it (new or changed since); "
            "write them to a new --out"
        )
    print(f"{out} is already complete ({len(keys)} files); nothing to resume", file=sys.stderr)
    return 0
