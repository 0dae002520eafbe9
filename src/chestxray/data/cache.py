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
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data.images import read_image
from chestxray.data.transforms import CROPS, center_crop, resize_gray
from chestxray.errors import DatasetError, ImageReadError
from chestxray.io import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 224


def default_cache_dir(root: str | os.PathLike) -> Path:
    """$CHESTXRAY_CACHE/<root name>-<hash>, else $XDG_CACHE_HOME (~/.cache)/chestxray/<root
    name>-<hash>. Never inside the dataset root: NIH roots are often shared or read-only
    (and a root-owned process would pass a write-access check on a read-only mount)."""
    import hashlib

    resolved = Path(root).resolve()
    tag = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    env = os.environ.get("CHESTXRAY_CACHE")
    if env:
        return Path(env) / tag
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chestxray" / tag


@dataclass
class PrepareReport:
    cache_dir: Path
    total: int
    decoded: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)


def cache_folder(cache_dir: str | os.PathLike, size: int, crop: str = "none") -> Path:
    """`<size>/` holds whole images resized; `<size>-center/` centre-cropped squares resized,
    for models that predict that way (torchxrayvision's), so training sees their framing."""
    if crop not in CROPS:
        raise DatasetError(f"cache: unknown crop {crop!r}; known: {', '.join(CROPS)}")
    return Path(cache_dir) / (str(size) if crop == "none" else f"{size}-{crop}")


def _decode_one(job: tuple[int, str, int, str]) -> tuple[int, np.ndarray | None, str | None]:
    pos, path, size, crop = job
    try:
        image = read_image(path)
        return pos, resize_gray(center_crop(image) if crop == "center" else image, size), None
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
    crop: str = "none",
) -> PrepareReport:
    """Decode and resize `items` ((name, path) pairs) into `cache_dir/<size>/` (with
    `crop="center"`: centre-cropped first, into `cache_dir/<size>-center/`)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 2048:
        raise DatasetError(f"cache size must be between 8 and 2048 pixels, got {size!r}")
    size = int(size)
    if workers is not None and workers < 1:
        raise DatasetError(f"workers must be at least 1, got {workers}")
    folder = cache_folder(cache_dir, size, crop)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot create the cache folder ({exc.strerror or exc})") from None
    names = [n for n, _ in items]
    paths = [str(p) for _, p in items]
    for name in names:
        if not name or "\n" in name:
            raise DatasetError(f"cache: invalid image name {name!r}")
    if len(set(names)) != len(names):
        dupes = sorted(n for n, k in Counter(names).items() if k > 1)
        raise DatasetError(f"cache: image names must be unique; repeated: {', '.join(dupes[:5])}")
    names_file, images_file, done_file = folder / "names.txt", folder / "images.npy", folder / "done.npy"
    fresh = not _resumable(folder, names, size)
    if fresh:
        for f in (images_file, done_file, folder / "failed.json"):
            f.unlink(missing_ok=True)
        images = np.lib.format.open_memmap(images_file, mode="w+", dtype=np.uint8, shape=(len(names), size, size))
        done = np.zeros(len(names), dtype=bool)
        _save_done(done_file, done)
        atomic_write_text(names_file, "\n".join(names) + ("\n" if names else ""))
    else:
        images = np.load(images_file, mmap_mode="r+")
        done = np.load(done_file)
    todo = np.flatnonzero(~done)
    failed: dict[str, str] = {}
    jobs = [(int(i), paths[i], size, crop) for i in todo]
    workers = min(workers if workers is not None else (os.cpu_count() or 1), max(1, len(jobs)))
    decoded = 0
    results: Iterable
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        # Small chunks keep the bar moving and the tail short; results come back in order.
        results = pool.map(_decode_one, jobs, chunksize=8) if pool else map(_decode_one, jobs)
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
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the queued work
        images.flush()
        _save_done(done_file, done)
        del images
    atomic_write_text(folder / "failed.json", json.dumps(failed, indent=1))
    return PrepareReport(folder, len(names), decoded, len(names) - len(todo), failed)


def _resumable(folder: Path, names: list[str], size: int) -> bool:
    """True when `folder` holds a cache of exactly these names at this size."""
    names_file, images_file, done_file = folder / "names.txt", folder / "images.npy", folder / "done.npy"
    if not (names_file.exists() and images_file.exists() and done_file.exists()):
        return False
    try:
        same = names_file.read_text().splitlines() == names
        shape = np.load(images_file, mmap_mode="r").shape
        done = np.load(done_file)
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable cache (%s); rebuilding it", folder, exc)
        return False
    if not same:
        log.warning("%s: image list changed; rebuilding the cache", folder)
        return False
    if shape != (len(names), size, size) or done.shape != (len(names),) or done.dtype != bool:
        log.warning("%s: cache files do not match the image list; rebuilding the cache", folder)
        return False
    return True


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
    def open(cls, cache_dir: str | os.PathLike, size: int, crop: str = "none") -> "PreparedCache":
        folder = cache_folder(cache_dir, size, crop)
        try:
            names = folder.joinpath("names.txt").read_text().splitlines()
            images = np.load(folder / "images.npy", mmap_mode="r")
            done = np.load(folder / "done.npy")
        except FileNotFoundError:
            raise DatasetError(f"{folder}: no prepared cache of {size}px; run `chestxray prepare`") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{folder}: unreadable cache ({exc}); run `chestxray prepare` again") from None
        if images.shape != (len(names), size, size) or done.shape != (len(names),):
            raise DatasetError(
                f"{folder}: cache files disagree (images {images.shape}, {len(names)} names, "
                f"done {done.shape}); run `chestxray prepare` again"
            )
        return cls(folder, size, names, images, done)

    def __len__(self) -> int:
        return len(self.names)

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
