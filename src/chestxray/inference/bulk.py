"""Bulk prediction as one request: list the inputs, predict them through the streaming
pipeline and write the results (streamed and resumable to a file, streamed to a stream,
or returned for the caller to render).

`chestxray predict` maps its arguments to a `BulkRequest` and prints what `run` returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from chestxray.errors import ChestXrayError
from chestxray.inference.inputs import InputFile, Shard, count_inputs, iter_inputs, list_is_rereadable
from chestxray.inference.outputs import STREAM_FORMATS

if TYPE_CHECKING:
    from chestxray.inference.distributed import DistInfo
    from chestxray.inference.pipeline import Progress
    from chestxray.inference.predict import Analyzer, Prediction

# Collectives wait this long for the slowest rank (its whole shard), not torch's 30 minutes.
DIST_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class BulkRequest:
    """What to predict and where the results go.

    `datasets`: the image paths of each dataset root (`inputs.dataset_paths`), listed before
    the model loads so that a wrong root fails at once; `dataset_specs` name them.
    `fmt`: table, json, csv, jsonl or parquet. With `out` and csv/jsonl/parquet the results
    stream into a journal next to `out` (`outputs.Journal`); `resume` continues one, `force`
    accepts a journal of other inputs or another shard (its results of files not listed
    now are dropped). csv/jsonl without `out` stream to the caller's stream; table and json
    are returned as predictions. `workers`: decoder processes (None: all cores)."""

    paths: Sequence[str] = ()
    from_list: str | None = None
    datasets: Sequence[Sequence[str]] = ()
    dataset_specs: Sequence[str] = ()
    split: str | None = None
    shard: Shard = field(default_factory=Shard)
    fmt: str = "table"
    out: Path | None = None
    workers: int | None = None
    batch_size: int = 16
    resume: bool = False
    force: bool = False
    progress: bool = True
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        if self.resume and not (self.out and self.fmt in STREAM_FORMATS):
            raise ChestXrayError("resume needs an output file in csv, jsonl or parquet")
        if self.force and not self.resume:
            raise ChestXrayError("force only applies when resuming")
        if self.fmt == "parquet" and not self.out:
            raise ChestXrayError("parquet output needs an output file")

    @property
    def streams_to_file(self) -> bool:
        return self.out is not None and self.fmt in STREAM_FORMATS

    def files(self, shard: Shard | None = None) -> Iterator[InputFile]:
        return iter_inputs(self.paths, self.from_list, shard or self.shard, self.datasets)

    def may_be_many(self) -> bool:
        """More than one batch may come (a folder, a glob, a list): worth starting the
        workers' server early. A few named files are decoded in-process anyway."""
        return (
            bool(self.from_list)
            or sum(len(d) for d in self.datasets) + len(self.paths) > self.batch_size
            or any(os.path.isdir(p) or not os.path.exists(p) for p in self.paths)
        )

    def spec(self, shard: Shard) -> dict[str, Any]:
        """The inputs and shard as a journal's header keeps them (see `outputs.Journal`)."""
        from_list = self.from_list
        if from_list is not None:
            from_list = os.path.abspath(from_list) if list_is_rereadable(from_list) else "<pipe>"
        inputs = {
            "cwd": os.getcwd(),
            "paths": list(self.paths),
            "from_list": from_list,
            "datasets": list(self.dataset_specs),
            "split": self.split,
        }
        return {"inputs": inputs, "shard": f"{shard.index}/{shard.count}"}

    def where(self) -> str:
        return ", ".join(list(self.paths) + ([self.from_list] if self.from_list else []) + list(self.dataset_specs))


@dataclass
class BulkResult:
    """What a run did. `predictions`: the results when they are the caller's to render
    (table, json); `failures`: the first unreadable files (name, reason) of `errors`."""

    total: int = 0
    errors: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    predictions: list["Prediction"] | None = None
    wrote: Path | None = None
    notes: list[str] = field(default_factory=list)
    already_complete: bool = False  # resumed a finished output: nothing was done
    is_main: bool = True  # under torchrun: rank 0, which merged the output and reports it


def check_output_file(out: Path) -> None:
    """Refuse, before any work, an output that cannot be written or must not be: a folder,
    an image (a file named .png... or whose content is one), an unwritable place."""
    from chestxray.data.images import IMAGE_SUFFIXES, sniff_image_format
    from chestxray.io import check_writable

    if out.is_dir():
        raise ChestXrayError(f"{out}: is a folder; name the output file, e.g. {out / 'predictions.csv'}")
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise ChestXrayError(f"{out}: the output would overwrite an image file; name it e.g. predictions.csv")
    if out.is_file():
        try:
            with open(out, "rb") as f:
                head = f.read(132)
        except OSError:
            head = b""
        if sniff_image_format(head) is not None:
            raise ChestXrayError(f"{out}: is an image; the output must not overwrite an input")
    check_writable(out)


def prepare(request: BulkRequest, device: str, start_workers: bool = True) -> tuple["DistInfo", str]:
    """Join torchrun's process group if launched by it (each rank gets its own GPU) and start
    the decoders' fork server (its imports overlap the model load)."""
    from chestxray.inference.distributed import DistInfo, init_distributed, launched_by_torchrun
    from chestxray.inference.pipeline import start_worker_server

    if request.out is not None:
        check_output_file(request.out)
    if start_workers and request.workers != 0 and request.may_be_many():
        start_worker_server()
    if not launched_by_torchrun():
        return DistInfo(), device
    info = init_distributed(device, timeout_s=DIST_TIMEOUT_S)
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    return info, device


def run(
    request: BulkRequest, analyzer: "Analyzer", info: "DistInfo | None" = None, stream: IO[str] | None = None
) -> BulkResult:
    """Predict the request's files. `stream`: where csv/jsonl without an output file go
    (default stdout)."""
    from chestxray.inference.distributed import DistInfo
    from chestxray.inference.pipeline import default_workers

    info = info or DistInfo()
    workers = default_workers(info.local_world_size) if request.workers is None else request.workers
    backend = analyzer.backend
    if workers > 0 and backend.name == "torch" and str(backend.device) == "cpu":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as onnxruntime's one thread: the decoder processes have the other cores
        try:
            return _run(request, analyzer, info, workers, stream or sys.stdout)
        finally:
            torch.set_num_threads(threads)
    return _run(request, analyzer, info, workers, stream or sys.stdout)


def model_label(analyzer: "Analyzer") -> str:
    """The model as outputs name it: name and variant (e.g. "onnx int8")."""
    return f"{analyzer.name} ({analyzer.variant})"


def check_any(n: int, request: BulkRequest) -> None:
    if n == 0:
        from chestxray.data.images import IMAGE_SUFFIXES

        raise ChestXrayError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {request.where()}")


def _predict(
    analyzer: "Analyzer", files: Iterator[InputFile], workers: int, batch_size: int, progress: "Progress"
) -> Iterator[tuple[InputFile, "Prediction"]]:
    for f, p in analyzer.predict_files(files, workers=workers, batch_size=batch_size):
        progress.update(1, errors=int(not p.ok))
        yield f, p


def _run(request: BulkRequest, analyzer: "Analyzer", info: "DistInfo", workers: int, stream: IO[str]) -> BulkResult:
    from chestxray.inference.pipeline import Progress, chunked

    shard = request.shard.within(Shard(info.rank, info.world_size))
    files = request.files(shard)
    # The ETA needs a total: one extra listing pass (names only, no stat).
    total = count_inputs(request.paths, request.from_list, shard, request.datasets) if request.progress else None
    if request.streams_to_file:
        return _to_file(request, analyzer, info, shard, files, workers, total)
    tty = sys.stderr.isatty()
    enabled = request.progress and total != 1
    progress = Progress(total, tty=tty, every_s=request.progress_every_s, enabled=enabled)
    results = _predict(analyzer, files, workers, request.batch_size, progress)
    if request.fmt in ("csv", "jsonl"):
        from chestxray.inference.outputs import StdoutWriter, to_record

        writer = StdoutWriter(request.fmt, stream)
        result = BulkResult()
        for batch in chunked(results, request.batch_size):
            writer.write([to_record(f, p) for f, p in batch])
            result.errors += sum(1 for _, p in batch if p.error)
            result.failures += [(p.file, p.error) for _, p in batch if p.error][: 20 - len(result.failures)]
            result.total += len(batch)
        progress.close()
        check_any(result.total, request)
        return result
    predictions = [p for _, p in results]
    progress.close()
    check_any(len(predictions), request)
    failures = [(p.file, p.error) for p in predictions if p.error]
    return BulkResult(len(predictions), len(failures), failures[:20], predictions)


def _to_file(
    request: BulkRequest,
    analyzer: "Analyzer",
    info: "DistInfo",
    shard: Shard,
    files: Iterator[InputFile],
    workers: int,
    total: int | None,
) -> BulkResult:
    from chestxray.inference.distributed import all_sum, barrier
    from chestxray.inference.outputs import Journal, finalize, journal_path, to_record
    from chestxray.inference.pipeline import Progress, chunked

    assert request.out is not None  # streams_to_file
    out = request.out
    jpath = journal_path(out, info.rank, info.world_size)
    if (
        request.resume
        and out.exists()
        and not any(journal_path(out, r, info.world_size).exists() for r in range(info.world_size))
    ):
        return _already_complete(out, request.fmt, files)
    journal = Journal(
        jpath, resume=request.resume, model_name=analyzer.name, spec=request.spec(shard), force=request.force
    )
    todo = (f for f in files if not journal.skip(f))
    left = None if total is None else max(total - len(journal.done), 0)
    every = request.progress_every_s
    progress = Progress(left, tty=sys.stderr.isatty(), every_s=every, enabled=request.progress)
    try:
        for batch in chunked(_predict(analyzer, todo, workers, request.batch_size, progress), request.batch_size):
            journal.append([to_record(f, p) for f, p in batch])
    except OSError as exc:
        journal.abort()
        raise ChestXrayError(
            f"{jpath}: cannot write ({exc.strerror or type(exc).__name__}); the results written so far stay there: "
            "make room and rerun with resume=True"
        ) from None
    except BaseException:
        journal.abort()  # what is in the journal stays: --resume continues from it
        raise
    progress.close()
    try:
        journal.close()
    except OSError as exc:
        raise ChestXrayError(f"{jpath}: cannot write ({exc.strerror or type(exc).__name__})") from None
    result = BulkResult(wrote=out, is_main=info.is_main)
    if journal.discarded:
        result.notes.append(f"dropped {journal.discarded} results of files this run does not list from {jpath} (force)")
    listed = all_sum(journal.written + len(journal.matched), info)  # also waits for every rank
    parts = [journal_path(out, r, info.world_size) for r in range(info.world_size)]
    if listed == 0:
        barrier(info)
        if info.is_main:
            for part in parts:
                part.unlink(missing_ok=True)
        check_any(0, request)
    errors = 0
    if info.is_main:
        try:
            summary = finalize(out, request.fmt, parts, analyzer.labels)
        except OSError as exc:
            raise ChestXrayError(
                f"{out}: cannot write ({exc.strerror or type(exc).__name__}); the results stay in {parts[0]}: "
                "make room and rerun with resume=True"
            ) from None
        if summary.total + summary.duplicates != listed:
            raise ChestXrayError(
                f"{out}: merged {summary.total} rows for {listed} listed files; rerun with resume=True"
            )
        errors = summary.errors
        result.total, result.errors, result.failures = summary.total, summary.errors, summary.failures
    result.errors = all_sum(errors, info)  # every rank exits alike, after rank 0 has merged
    barrier(info)
    return result


def _already_complete(out: Path, fmt: str, files: Iterator[InputFile]) -> BulkResult:
    from chestxray.inference.outputs import complete_output_keys, escape_name

    keys: Any = complete_output_keys(out, fmt)
    by_path = fmt == "csv"  # a CSV holds no size/mtime columns: matched by path only
    missing = sum(
        1 for f in files if (escape_name(f.path) if by_path else (escape_name(f.path), *f.key[1:])) not in keys
    )
    if missing:
        raise ChestXrayError(
            f"{out} is complete but {missing} listed files are not in it (new or changed since); "
            "write them to a new out=FILE"
        )
    return BulkResult(
        len(keys), already_complete=True, notes=[f"{out} is already complete ({len(keys)} files); nothing to resume"]
    )
