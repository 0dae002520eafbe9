"""What keeps the server within its means under load: settings, admission control, a
bounded decode pool and dynamic batching of inference.

A request that carries an upload has its body read first, within bounds of its own
(`max_receiving` bodies at once, `max_receiving_per_client` per client address, each
arriving at `min_receive_rate` bytes/s or better), so that slow clients never hold a
compute slot. Then it is admitted (or refused at once with 503 and `Retry-After` when
`queue_length` requests are already inside), decoded in a pool of `decode_threads` threads (so at most that many images are being
decoded at any time, whatever the load), and its model input joins a batch: requests
that arrive within `max_wait_ms` of each other run through the network together, up
to `max_batch`. One inference thread runs the batches and Grad-CAM, so the torch model
and its hooks are never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server process (each worker of `--workers N` has its own)."""

    max_upload_bytes: int = 20 * 2**20
    #: Refuse images whose decoded size (w x h x channels x bytes per sample) is larger.
    max_decode_bytes: int = 128 * 2**20
    #: Images decoded at once; default the number of cores.
    decode_threads: int = field(default_factory=_cores)
    #: Requests inside (decoding, waiting for or in inference) at once; more get 503.
    queue_length: int = 64
    #: Upload bodies being received at once, and per client address; more get 503.
    max_receiving: int = 128
    max_receiving_per_client: int = 16
    #: Bodies slower than this (bytes/s, after `receive_grace_s`) are cut with 408.
    min_receive_rate: float = 8 * 1024
    receive_grace_s: float = 5.0
    #: Refuse (413) DICOM uploads whose header holds more data elements than this.
    max_dicom_elements: int = 20_000
    #: A request not answered within this many seconds of admission gets 503.
    request_deadline_s: float = 30.0
    max_batch: int = 16
    max_wait_ms: float = 5.0
    #: The whole request head must arrive within this (see `protocol.py`).
    header_timeout_s: float = 10.0
    #: The whole body must arrive within this.
    body_timeout_s: float = 60.0
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        counts = ("max_upload_bytes", "max_decode_bytes", "decode_threads", "queue_length", "max_batch")
        for name in (*counts, "max_receiving", "max_receiving_per_client", "max_dicom_elements"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_deadline_s", "header_timeout_s", "body_timeout_s", "receive_grace_s"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if not 0 <= self.min_receive_rate < math.inf:
            raise ValueError(f"min_receive_rate must be >= 0, got {self.min_receive_rate}")
        if not 0 <= self.max_wait_ms < math.inf:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Busy(Exception):
    """The server cannot take this request now: answer 503 with Retry-After."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Admission:
    """A counter of requests inside, refused past `limit` (no waiting line: a full server
    answers at once, and the client retries after `Retry-After`). Event-loop only."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.inside = 0
        self._on_change = on_change

    @property
    def has_room(self) -> bool:
        return self.inside < self.limit

    def enter(self) -> None:
        if self.inside >= self.limit:
            raise Busy(f"the server is busy ({self.limit} requests in progress); retry shortly")
        self.inside += 1
        if self._on_change:
            self._on_change(self.inside)

    def leave(self) -> None:
        self.inside = max(0, self.inside - 1)
        if self._on_change:
            self._on_change(self.inside)


class Receiving:
    """Bodies being received: at most `limit` at once and `per_client` per client address,
    refused at once past either (a slow client cannot hold the slots of others). Event-loop only."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self.inside = 0
        self.by_client: dict[str, int] = {}

    def refusal(self, client: str) -> str | None:
        if self.inside >= self.limit:
            return f"the server is receiving {self.limit} uploads; retry shortly"
        if self.by_client.get(client, 0) >= self.per_client:
            return f"this client is already sending {self.per_client} uploads; retry shortly"
        return None

    @contextlib.contextmanager
    def receiving(self, client: str) -> Iterator[None]:
        reason = self.refusal(client)
        if reason is not None:
            raise Busy(reason)
        self.inside += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            yield
        finally:
            self.inside -= 1
            left = self.by_client.pop(client) - 1
            if left:
                self.by_client[client] = left


def _malloc_trim() -> Callable[[], None]:
    """glibc keeps freed decode buffers in its arenas; malloc_trim gives them back to the OS
    (measured in BENCHMARKS.md). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def run() -> None:
        trim(0)

    return run


class DecodePool:
    """At most `threads` decodes at a time; memory is handed back when the pool goes idle."""

    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chestxray-decode")
        self._busy = 0
        self._lock = threading.Lock()
        self._trim = _malloc_trim()

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._busy += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy -= 1
                idle = self._busy == 0
            if idle:
                self._trim()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Batcher(Generic[T, R]):
    """Collects items that arrive within `max_wait_s` of the first one (up to `max_batch`)
    and runs `run(items)` -> one result per item, in `executor` (one thread). Event-loop side
    only; a cancelled waiter (deadline, client gone) is dropped from its batch."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._on_batch = on_batch
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a batch."""
        return sum(not p[1].done() for p in self._pending)

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._pending, self._wake = loop, [], asyncio.Event()
            self._task = loop.create_task(self._serve())
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, time.monotonic()))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _serve(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._pending = [p for p in self._pending if not p[1].done()]
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._pending[0][2]
            while len(self._pending) < self.max_batch:
                left = first + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [p for p in self._pending[: self.max_batch] if not p[1].done()]
            self._pending = self._pending[self.max_batch :]
            if not batch:
                continue
            if self._on_batch:
                self._on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._run, [p[0] for p in batch])
            except Exception as exc:  # hand the error to every waiter; the loop goes on
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut, _), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, RuntimeError):
                pass
