"""Batches for training and validation straight from the prepared uint8 cache.

The split's images sit in host memory as one uint8 tensor, or, for a split too big for
memory, stay in the prepared cache's memmaps (`MemmapImages`, gathered per batch); a background thread
gathers each batch into a pinned buffer and starts the host-to-device copy, so the
device never waits on decoding or Python per-sample work. Shuffling is seeded per
epoch (seed, epoch) and sharded by rank for DistributedDataParallel, which makes a
resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

LOADERS = ("auto", "ram", "memmap")
RAM_SHARE = 0.5  # auto: hold a split in RAM when it takes at most this share of available memory


def available_memory() -> int:
    """Bytes of memory available now (Linux /proc/meminfo), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_loader(nbytes: int, mode: str = "auto") -> str:
    """'ram' or 'memmap' for a split of `nbytes` ('auto': RAM when it fits comfortably)."""
    if mode not in LOADERS:
        raise ValueError(f"unknown loader {mode!r}; choose {', '.join(LOADERS)}")
    if mode != "auto":
        return mode
    return "ram" if nbytes <= RAM_SHARE * available_memory() else "memmap"


class MemmapImages:
    """Rows of one or more cache memmaps (segments of (images, rows)), read per batch.

    A batch is read segment by segment in ascending row order (sequential I/O on disk),
    then put back in the batch's order, so a split larger than memory trains from the cache.
    """

    def __init__(self, segments: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.segments = [(images, np.asarray(rows, dtype=np.int64)) for images, rows in segments]
        sizes = [len(rows) for _, rows in self.segments]
        self.offsets = np.cumsum([0, *sizes])
        first = self.segments[0][0] if self.segments else np.zeros((0, 1, 1), np.uint8)
        self.shape = (int(self.offsets[-1]), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def gather(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        seg = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(seg):
            images, rows = self.segments[s]
            where = np.flatnonzero(seg == s)
            local = rows[idx[where] - self.offsets[s]]
            order = np.argsort(local, kind="stable")
            out[where[order]] = images[local[order]]
        return out

    def to_ram(self) -> np.ndarray:
        return self.gather(np.arange(len(self)))


class CacheBatches:
    def __init__(
        self,
        images: np.ndarray | MemmapImages,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 3,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label rows")
        # (N, S, S) uint8 in RAM, or read from the memmaps batch by batch
        self.source = images if isinstance(images, MemmapImages) else None
        self.n = len(images)
        self.images = (
            torch.from_numpy(np.ascontiguousarray(images)) if not isinstance(images, MemmapImages) else torch.empty(0)
        )
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """This rank's row order for the current epoch."""
        n = self.n
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            idx = rng.permutation(n)
        else:
            idx = np.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size if self.drop_last or self.shuffle else -(-n // self.world_size)
            if self.shuffle or self.drop_last:
                idx = idx[: per_rank * self.world_size]
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        idx = self.order()
        pin = self.device.type == "cuda"
        stop = len(idx) - (len(idx) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            rows = torch.from_numpy(idx[start : start + self.batch_size])
            if self.source is not None:
                x = torch.from_numpy(self.source.gather(rows.numpy()))
            else:
                x = self.images.index_select(0, rows)
            y = self.labels.index_select(0, rows)
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield rows, x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(row indices, uint8 images (B, S, S) on device, labels (B, C) on device)."""
        if self.prefetch <= 0:
            yield from self._batches()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._batches():
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(done)
            except BaseException as exc:  # surface loader errors in the training thread
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="cache-batches")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def to_model_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1]: the eval preset's output for a
    cached image (the cache holds images already resized by `resize_gray`)."""
    return batch_u8.unsqueeze(1).float().div_(255.0)
