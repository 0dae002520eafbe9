"""The prepared cache: every image decoded once, resized, stored as uint8 for training.

Layout of `CACHE_DIR/<size>/`:
  images.npy   (N, size, size) uint8, a numpy memmap in index order
  names.txt    the N image names, one per line (the order of images.npy)
  done.npy     (N,) bool, which rows hold a decoded image
  failed.json  {name: reason} of files that could not be read
Re-running fills only rows not yet done, so an interrupted prepare resumes.
Training reads rows with plain indexing: no decoding in the loop.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data.images import read_image
from chestxray.data.transforms import resize_gray
from chestxray.errors import DatasetError, ImageReadError
from chestxray.io import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 224


def default_cache_dir(root: str | os.PathLike) -> Path:
    """$CHESTXRAY_CACHE/<root name>-<hash>, else ROOT/.chestxray-cache when the root is
    writable, else ~/.cache/chestxray/<root name>-<hash> (NIH roots are often read-only)."""
    import hashlib

    resolved = Path(root).resolve()
    tag = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    env = os.environ.get("CHESTXRAY_CACHE")
    if env:
        return Path(env) / tag
    if os.access(resolved, os.W_OK):
        return resolved / ".chestxray-cache"
    return Path.home() / ".cache" / "chestxray" / tag


@dataclass
class PrepareReport:
    cache_dir: Path
    total: int
    decoded: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)


def _decode_one(job: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str | None]:
    pos, path, size = job
    try:
        return pos, resize_gray(read_image(path), size), None
    except ImageReadError as exc:
        return pos, None, exc.reason
    except Exception as exc:  # keep the batch going; report the file
        return pos, None, f"{type(exc).__name__}: {exc}"


def prepare_cache(
    items: Sequence[tuple[str, str | os.PathLike]],
    cache_dir: str | os.PathLike,
    size: int = DEFAULT_CACHE_SIZE,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Decode and resize `items` ((name, path) pairs) into `cache_dir/<size>/`."""
    if size < 8 or size > 2048:
        raise DatasetError(f"cache size must be between 8 and 2048 pixels, got {size}")
    folder = Path(cache_dir) / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in items]
    paths = [str(p) for _, p in items]
    names_file, images_file, done_file = folder / "names.txt", folder / "images.npy", folder / "done.npy"
    fresh = True
    if names_file.exists() and images_file.exists() and done_file.exists():
        if names_file.read_text().splitlines() == names:
            fresh = False
        else:
            log.warning("%s: image list changed; rebuilding the cache", folder)
    if fresh:
        for f in (images_file, done_file, folder / "failed.json"):
            f.unlink(missing_ok=True)
        images = np.lib.format.open_memmap(images_file, mode="w+", dtype=np.uint8, shape=(len(names), size, size))
        done = np.zeros(len(names), dtype=bool)
        np.save(done_file, done)
        atomic_write_text(names_file, "\n".join(names) + ("\n" if names else ""))
    else:
        images = np.load(images_file, mmap_mode="r+")
        done = np.load(done_file)
    todo = np.flatnonzero(~done)
    failed: dict[str, str] = {}
    jobs = [(int(i), paths[i], size) for i in todo]
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    decoded = 0
    results: Iterable
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.map(_decode_one, jobs, chunksize=16) if pool else map(_decode_one, jobs)
        from tqdm.auto import tqdm

        bar = tqdm(results, total=len(jobs), desc=f"prepare {size}px", unit="img", disable=not progress)
        for n, (pos, arr, reason) in enumerate(bar, 1):
            if arr is None:
                failed[names[pos]] = reason or "unknown error"
            else:
                images[pos] = arr
                done[pos] = True
                decoded += 1
            if n % 2048 == 0:  # checkpoint progress so an interrupted run resumes
                images.flush()
                _save_done(done_file, done)
    finally:
        if pool:
            pool.shutdown()
        images.flush()
        _save_done(done_file, done)
        del images
    atomic_write_text(folder / "failed.json", json.dumps(failed, indent=1))
    return PrepareReport(folder, len(names), decoded, len(names) - len(todo), failed)


def _save_done(path: Path, done: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, path)


@dataclass
class PreparedCache:
    """Read side of the cache: `images[i]` is the uint8 (size, size) image of `names[i]`."""

    folder: Path
    size: int
    names: list[str]
    images: np.ndarray
    done: np.ndarray

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, size: int) -> "PreparedCache":
        folder = Path(cache_dir) / str(size)
        try:
            names = folder.joinpath("names.txt").read_text().splitlines()
            images = np.load(folder / "images.npy", mmap_mode="r")
            done = np.load(folder / "done.npy")
        except FileNotFoundError:
            raise DatasetError(f"{folder}: no prepared cache of {size}px; run `chestxray prepare`") from None
        return cls(folder, size, names, images, done)

    def positions(self, names: Sequence[str]) -> np.ndarray:
        """Cache rows of `names`; an error names the first that is absent or failed."""
        lookup = {n: i for i, n in enumerate(self.names)}
        out = np.empty(len(names), dtype=np.int64)
        for k, name in enumerate(names):
            i = lookup.get(name)
            if i is None or not self.done[i]:
                why = "not in the cache" if i is None else "failed to decode (see failed.json)"
                raise DatasetError(f"{self.folder}: image {name} {why}")
            out[k] = i
        return out

    @property
    def failed(self) -> dict[str, str]:
        path = self.folder / "failed.json"
        return json.loads(path.read_text()) if path.exists() else {}
