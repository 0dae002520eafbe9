"""Streaming batch prediction: decode in worker processes, infer in batches, yield in order.

    files (lazy) -> chunks of --batch-size -> worker pool: Predictor.preprocess per file
    (bounded window of chunks in flight) -> Analyzer.run per batch -> findings

The only place that decodes, checks, batches and runs images: `Analyzer.predict`,
`predict_many`, `predict_files` and `embed`, bulk predict and the server all come here
(inputs in memory are decoded in this process).

A CPU backend that rebuilds from its file (ONNX) infers in the workers too when they have
every core and are at least 3 (`workers_infer`): each worker decodes and infers its own
files, so every core does both and this process only puts results in order: inference in
one main process capped bulk predict at one core's inference rate (BENCHMARKS.md, bulk
predict). With fewer workers than cores, or on 2 cores, this process infers while they decode. A GPU backend infers here, in batches, fed by the
workers' decoded inputs.

Results come back in input order. Memory is bounded by the window (prefetch x batch
images), never by the number of files. A file that cannot be read gives an error row; a
decoder process that dies is replaced and only the file that killed it gets an error row.
On CUDA, each batch is copied into a pinned buffer and sent to the GPU on a side stream
while the previous batch computes.
"""

from __future__ import annotations

import copy
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from typing import IO, Any, Protocol, TypeVar

import numpy as np

from chestxray.errors import ImageReadError
from chestxray.inference.backend import Backend
from chestxray.inference.inputs import InputFile

log = logging.getLogger(__name__)
T = TypeVar("T")


class Predictor(Protocol):
    """What the pipeline uses of an `Analyzer` (whose module builds on this one)."""

    name: str
    batch_size: int
    backend: Backend

    def preprocess(self, image: Any, name: str | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def run(self, batch: Any) -> tuple[np.ndarray, Any]: ...


# (the chunk's model inputs stacked, or None when none could be read; {index in chunk: error}).
# When workers infer, the first item is (probabilities, input-check scores or None) instead.
Decoded = tuple[Any, dict[int, str]]
CRASHED = "the image decoder crashed on this file"
TASK_FILES = 4  # files per worker task
# Imported once by the fork server, not by each worker: the decoder's modules, the bundle
# metadata class its pickle names, and PIL's decoders (else loaded on the first file).
PRELOAD = [
    "chestxray.inference.predict",
    "chestxray.inference.pipeline",
    "chestxray.models.bundle",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
]


def default_workers(local_processes: int = 1) -> int:
    """All cores this process may use, shared among the processes on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_processes))


def decode_chunk(analyzer: Predictor, files: list[InputFile]) -> Decoded:
    """The model inputs stacked, and a reason for each file that failed: one bad file must
    not lose its batch."""
    xs: list[np.ndarray] = []
    errors: dict[int, str] = {}
    for i, f in enumerate(files):
        try:
            xs.append(analyzer.preprocess(f.source, f.path)[1])
        except ImageReadError as exc:
            errors[i] = exc.reason
        except Exception as exc:  # only the type: library messages can quote file contents
            errors[i] = f"cannot read this input ({type(exc).__name__})"
    return (np.stack(xs) if xs else None), errors


_WORKER: Predictor | None = None
_WORKER_INFERS = False


def _init_worker(decoder: Predictor, recipe: Any, parent: int) -> None:
    global _WORKER, _WORKER_INFERS
    if recipe is not None:
        decoder.backend = recipe()
    _WORKER, _WORKER_INFERS = decoder, recipe is not None
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(pid: int) -> None:
    """A worker outlives a parent killed with -9 (nobody sends it the stop sentinel): poll
    for the parent and leave when it is gone."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def _worker_decode(files: list[InputFile]) -> Decoded:
    assert _WORKER is not None  # set by the pool initializer
    x, errors = decode_chunk(_WORKER, files)
    if _WORKER_INFERS and x is not None:
        return _WORKER.run(x), errors
    return x, errors


def _join(parts: list[Any]) -> Any:
    """One chunk's pieces from several worker tasks: input stacks, or (probabilities, scores)."""
    if not parts:
        return None
    if isinstance(parts[0], tuple):
        scores = None if parts[0][1] is None else np.concatenate([s for _, s in parts])
        return np.concatenate([p for p, _ in parts]), scores
    return np.concatenate(parts)


def mp_context() -> Any:
    """forkserver: workers never inherit this process's onnxruntime/torch/gloo threads, and
    the server imports the decoder's modules once, so each worker starts without importing."""
    if sys.platform == "win32":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_worker_server() -> None:
    """Start the fork server now: its imports then overlap the model load."""
    if sys.platform != "win32":
        from multiprocessing import forkserver

        mp_context()
        forkserver.ensure_running()


@contextmanager
def main_script_hidden() -> Iterator[None]:
    """Worker processes started by forkserver or spawn first re-run the caller's main script
    from its `__file__`. A script piped to `python -` has none on disk ("<stdin>"), so every
    worker would die. They need nothing from it (their task function lives in this module):
    hide that name while they start, as for `python -c`."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str) or getattr(main, "__spec__", None) is not None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class DecodePool:
    """Ordered, bounded map of chunks of files -> Decoded, over worker processes
    (`workers` 0: in this process). `infer`: the workers also infer where the backend allows
    (`self.infers` says whether they do)."""

    def __init__(self, analyzer: Predictor, workers: int, prefetch: int | None = None, *, infer: bool = False) -> None:
        self.analyzer = analyzer
        self.workers = workers
        self.prefetch = prefetch or max(2, 2 * workers)
        # Workers get the Analyzer without its network (a session/model does not pickle): they
        # run its `preprocess` (and, when they infer, a backend rebuilt from its recipe).
        self._decoder = copy.copy(analyzer) if workers > 0 else analyzer
        if workers > 0:
            self._decoder.backend = Backend()
        self._recipe = analyzer.backend.worker_recipe() if (infer and workers > 0) else None
        self.infers = self._recipe is not None
        self._pool: ProcessPoolExecutor | None = None
        self.draining = False  # every chunk submitted: the workers run out of work

    def __enter__(self) -> "DecodePool":
        if self.workers > 0:
            self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _start(self) -> None:
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=mp_context(),
            initializer=_init_worker,
            initargs=(self._decoder, self._recipe, os.getpid()),
        )

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _submit(self, chunk: list[InputFile]) -> list[tuple[int, "Future[Decoded]"]] | None:
        if self._pool is None:
            return None  # decoded lazily, in order, in _collect
        # Small tasks: both workers start at once and the run's tail (one task) stays short.
        with main_script_hidden():  # the pool starts (or replaces) its workers in submit()
            return [
                (k, self._pool.submit(_worker_decode, chunk[k : k + TASK_FILES]))
                for k in range(0, len(chunk), TASK_FILES)
            ]

    def _collect(self, chunk: list[InputFile], tasks: list[tuple[int, "Future[Decoded]"]] | None) -> Decoded:
        if tasks is None:
            return decode_chunk(self._decoder, chunk)
        parts: list[Any] = []
        errors: dict[int, str] = {}
        try:
            for k, fut in tasks:
                x, errs = fut.result()
                if x is not None:
                    parts.append(x)
                errors.update({k + i: e for i, e in errs.items()})
        except BrokenProcessPool:
            self._model_loads()
            return self._one_by_one(chunk)
        return _join(parts), errors

    def _model_loads(self) -> None:
        """A model not built yet in this process (`Analyzer.load(background=True)`) is built now
        and raises its error, if any: the workers that rebuild it died of that, not of a file."""
        if self.infers:
            self.analyzer.backend.loaded()

    def _one_by_one(self, chunk: list[InputFile]) -> Decoded:
        """A worker died (a decoder crash, the OOM killer): redo this chunk file by file in a
        fresh pool, so only the file that kills a worker gets an error row."""
        log.warning("a decoder process died; retrying %d files one at a time", len(chunk))
        parts: list[Any] = []
        errors: dict[int, str] = {}
        for i, f in enumerate(chunk):
            self._restart()
            assert self._pool is not None
            try:
                with main_script_hidden():
                    task = self._pool.submit(_worker_decode, [f])
                x, err = task.result()
            except BrokenProcessPool:
                errors[i] = CRASHED
                continue
            if err:
                errors[i] = err[0]
            else:
                parts.append(x)
        self._restart()
        return _join(parts), errors

    def map(self, chunks: Iterable[list[InputFile]]) -> Iterator[tuple[list[InputFile], Decoded]]:
        window: deque[tuple[list[InputFile], list[tuple[int, Future[Decoded]]] | None]] = deque()
        self.draining = False
        for chunk in chunks:
            window.append((chunk, self._submit(chunk)))
            if len(window) >= self.prefetch:
                c, fut = window.popleft()
                yield c, self._collect(c, fut)
        self.draining = True
        while window:
            c, fut = window.popleft()
            yield c, self._collect(c, fut)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for f in items:
        chunk.append(f)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CudaStager:
    """Pinned host buffers and a copy stream: batch k+1 travels to the GPU while batch k
    computes. Two buffers, each reused only after its last copy finished."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: list[Any] = [None, None]
        self.events: list[Any] = [None, None]
        self.k = 0

    def __call__(self, x: np.ndarray) -> tuple[Any, Any]:
        torch = self.torch
        slot, self.k = self.k % 2, self.k + 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        buf = self.buffers[slot]
        if buf is None or buf.shape[0] < x.shape[0] or buf.shape[1:] != x.shape[1:]:
            buf = self.buffers[slot] = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host = buf[: x.shape[0]]
        host.numpy()[...] = x
        event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            event.record(self.stream)
        dev.record_stream(torch.cuda.current_stream(self.device))
        self.events[slot] = event
        return dev, event

    def ready(self, staged: tuple[Any, Any]) -> Any:
        dev, event = staged
        self.torch.cuda.current_stream(self.device).wait_event(event)  # queued on the GPU, no host wait
        return dev


def _cuda_stager(analyzer: Predictor) -> CudaStager | None:
    device = analyzer.backend.device
    if device is None or device.type != "cuda":
        return None
    return CudaStager(device)


def open_pool(analyzer: Predictor, workers: int | None = None, prefetch: int | None = None) -> DecodePool:
    """A decoder pool to keep across `iter_outputs(pool=...)` calls (a service's lifetime:
    its worker processes start once, not per batch). Use it as a context manager."""
    workers = default_workers() if workers is None else workers
    on_cuda = analyzer.backend.device is not None and analyzer.backend.device.type == "cuda"
    return DecodePool(analyzer, workers, prefetch, infer=workers_infer(workers, gpu=on_cuda))


def workers_infer(workers: int, gpu: bool) -> bool:
    """Whether the workers should infer (where the backend allows): when they have every core
    and are at least 3: one process inferring caps the rate at one core's inference. On 2 cores
    this process infers while 2 workers decode, which is faster there than the workers
    inferring (each infers small batches and swaps the model and the decoder in its caches), as
    with fewer workers than cores. On CUDA this process drives the GPU. Measurements:
    BENCHMARKS.md, bulk predict."""
    return not gpu and workers >= max(3, default_workers())


def iter_outputs(
    analyzer: Predictor,
    files: Iterable[InputFile],
    *,
    workers: int | None = None,
    batch_size: int | None = None,
    prefetch: int | None = None,
    features: bool = False,
    pool: DecodePool | None = None,
) -> Iterator[tuple[InputFile, Any, Any, str | None]]:
    """(file, probabilities, checks or None, None) or (file, None, None, error) for every
    file, in input order; the checks are the record `Analyzer.run` gives each image.
    `workers`: decoder processes (None: all cores; 0: decode in this process).
    `features`: (file, pooled feature vector, None, None) instead (`Analyzer.embed`).
    `pool`: an open pool from `open_pool` (then `workers` and `prefetch` are the pool's)."""
    if pool is not None and features and pool.infers:
        raise ValueError("features=True needs a pool whose workers decode only")
    workers = pool.workers if pool is not None else default_workers() if workers is None else workers
    chunks = chunked(files, batch_size or analyzer.batch_size)
    first = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    if len(first) < 2 and pool is None:
        workers = 0  # one batch in all: starting worker processes would cost more than it saves
    stager = _cuda_stager(analyzer) if len(first) == 2 else None  # one batch: no copy to overlap
    infer: Callable[[Any], tuple[Any, Any]] = analyzer.run
    if features:
        infer = lambda x: (analyzer.backend.features(x), None)  # noqa: E731

    def emit(chunk: list[InputFile], out: Any, errors: dict[int, str]) -> Iterator[tuple[InputFile, Any, Any, Any]]:
        probs, scores = out if out is not None else ((), None)
        it = iter(probs)
        k = 0
        for i, f in enumerate(chunk):
            if i in errors:
                yield f, None, None, errors[i]
            else:
                yield f, next(it), (None if scores is None else scores[k]), None
                k += 1

    split = _tail_splitter(analyzer, workers, stager, infer)

    def finish(chunk: list[InputFile], staged: Any, errors: dict[int, str], tail: bool = False) -> Iterator[Any]:
        if staged is None:
            yield from emit(chunk, None, errors)
            return
        x = stager.ready(staged) if stager is not None else staged
        yield from emit(chunk, split(x) if tail and split is not None else infer(x), errors)

    pending: tuple[list[InputFile], Any, dict[int, str]] | None = None
    try:
        infers = not features and workers_infer(workers, gpu=stager is not None)
        decoders = pool or DecodePool(analyzer, workers, prefetch, infer=infers)
        with nullcontext() if pool is not None else decoders:  # a given pool stays open
            if not decoders.infers:
                analyzer.backend.start()  # this process infers: its session loads while the first files decode
            for chunk, (x, errors) in decoders.map(itertools.chain(first, chunks)):
                if decoders.infers:  # the workers ran the model: x is (probabilities, scores)
                    yield from emit(chunk, x, errors)
                    continue
                if stager is None:  # CPU inference in this process: each chunk as soon as it is decoded
                    yield from finish(chunk, x, errors, tail=decoders.draining and decoders.workers > 0)
                    continue
                staged = stager(x) if x is not None else x
                if pending is not None:
                    yield from finish(*pending)  # computes while this chunk's copy is in flight
                pending = (chunk, staged, errors)
            if pending is not None:
                yield from finish(*pending)
    finally:
        if split is not None:
            split.close()
        analyzer.backend.settle()  # a session build started above ends before this process may exit


class _TailSplitter:
    """Once every file has gone to the decoders they fall idle while this process still infers
    the last batches on one core: split each batch over threads to use those cores (one
    onnxruntime session runs concurrent calls; each call releases the GIL)."""

    def __init__(self, infer: Callable[[Any], tuple[Any, Any]], threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.infer = infer
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chestxray-infer")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        parts = [p for p in np.array_split(x, min(self.threads, len(x))) if len(p)]
        outs = list(self.pool.map(self.infer, parts))
        scores = [s for _, s in outs]
        joined = None if any(s is None for s in scores) else np.concatenate(scores)
        return np.concatenate([p for p, _ in outs]), joined

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _tail_splitter(
    analyzer: Predictor, workers: int, stager: Any, infer: Callable[[Any], tuple[Any, Any]]
) -> _TailSplitter | None:
    if workers < 1 or stager is not None or not analyzer.backend.concurrent_runs:
        return None
    return _TailSplitter(infer, max(2, min(workers + 1, default_workers())))


class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; otherwise one log line every `every_s` s."""

    def __init__(
        self,
        total: int | None,
        *,
        tty: bool | None = None,
        every_s: float = 30.0,
        desc: str = "predict",
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.every_s, self.enabled = total, desc, every_s, enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = self.errors = 0
        self.start = self.last = time.monotonic()
        self.bar: Any = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, file=self.stream, smoothing=0.1)

    def update(self, n: int = 1, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            if errors:
                self.bar.set_postfix(errors=self.errors, refresh=False)
        elif self.enabled and self.every_s > 0 and time.monotonic() - self.last >= self.every_s:
            self.log_line()

    def log_line(self) -> None:
        now = time.monotonic()
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            left = max(self.total - self.done, 0) / rate
            eta = f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        print(
            f"{self.desc}: {self.done}{of} images, {rate:.1f} img/s, {self.errors} errors{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.every_s > 0 and self.last > self.start:
            self.log_line()  # a closing line only for runs long enough to have logged before
