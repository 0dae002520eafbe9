"""Lazy input listing for bulk prediction: folders, globs, list files and dataset roots,
one file at a time.

The order is deterministic (the same as `collect_inputs`: each folder's entries sorted by
name, sub-folders walked where they sort; a dataset's images in its index's order), so a
shard, a resumed run and a merge all agree on which file is the k-th. Only one folder's
names are held at a time, never the archive's; a dataset root holds its index's paths.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chestxray.data.images import IMAGE_SUFFIXES
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.data.common import DatasetOptions

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputFile:
    """A file (or an input in memory) to predict and the identity `--resume` matches on (path, size, mtime)."""

    path: str
    size: int = -1  # -1: could not stat (missing); the decoder then gives the error row
    mtime_ns: int = -1
    # An input given by the caller (bytes, a gray array, a path): decoded instead of `path`,
    # which then only names it.
    data: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> Any:
        return self.path if self.data is None else self.data

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)

    @classmethod
    def of(cls, path: str) -> "InputFile":
        try:
            st = os.stat(path)  # follows symlinks: the target's size and time
        except (OSError, ValueError):  # ValueError: a NUL byte in a listed name
            return cls(path)
        return cls(path, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the files whose position k in the listing has k % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            i, n = (int(t) for t in text.split("/"))
        except ValueError:
            raise ChestXrayError(f"shard={text!r}: expected I/N, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise ChestXrayError(f"shard={text!r}: need 0 <= I < N (I counts from 0, like $SLURM_ARRAY_TASK_ID)")
        return cls(i, n)

    def within(self, sub: "Shard") -> "Shard":
        """Split this shard again (e.g. a job-array task into torchrun ranks)."""
        return Shard(self.index + self.count * sub.index, self.count * sub.count)


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk(folder: str, seen: set[tuple[int, int]]) -> Iterator[str]:
    """Image files under `folder`, sorted by name. Symlinks are followed, but each folder
    (device, inode) only once: a link back up the tree lists nothing twice and ends."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise ChestXrayError(f"{folder}: cannot list this folder ({exc.strerror or type(exc).__name__})") from None
    # Each entry is dropped once used: a DirEntry caches its stat result when is_dir()
    # follows a symlink (~0.7 KB), which held for every file made memory grow with the run.
    entries.reverse()
    while entries:
        e = entries.pop()
        try:
            is_dir = e.is_dir()
        except OSError:  # a link to itself (ELOOP), a vanished entry: not a folder to walk
            is_dir = False
        if is_dir:
            ident = _dir_id(e.path)
            if ident is not None and ident not in seen:
                seen.add(ident)
                yield from _walk(e.path, seen)
        elif e.name.lower().endswith(IMAGE_SUFFIXES) and _is_file(e):  # no FIFO, socket or device
            yield e.path


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _walk_root(folder: str) -> Iterator[str]:
    ident = _dir_id(folder)
    return _walk(folder, {ident} if ident is not None else set())


def _expand(arg: str) -> Iterator[str]:
    if os.path.isdir(arg):
        yield from _walk_root(arg)
    elif not os.path.exists(arg) and GLOB_CHARS & set(arg):
        # glob has no sorted lazy form; one pattern's matches are held, not the archive's.
        for match in sorted(glob.glob(arg, recursive=True)):
            if os.path.isdir(match):
                yield from _walk_root(match)
            elif match.lower().endswith(IMAGE_SUFFIXES):
                yield match
    else:
        yield arg  # kept as given: a missing, unreadable or odd file (FIFO...) gets an error row


def list_is_rereadable(list_file: str) -> bool:
    """False for a pipe (`--from-list <(find ...)`): it can be read only once."""
    try:
        return stat.S_ISREG(os.stat(list_file).st_mode)
    except (OSError, ValueError):
        return True  # _read_list reports it


def _read_list(list_file: str) -> Iterator[str]:
    """The names in a list file, one a line (blank lines and # comments skipped). A pipe is
    read too. Lines are bytes decoded as the file system does (os.fsdecode), so a name that
    is not UTF-8 still names its file."""
    try:
        mode = os.stat(list_file).st_mode
    except (OSError, ValueError):
        raise ChestXrayError(f"{list_file}: no such list file") from None
    if stat.S_ISDIR(mode):
        raise ChestXrayError(f"{list_file}: is a folder, not a list file")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise ChestXrayError(f"{list_file}: not a file or pipe")
    try:
        with open(list_file, "rb") as f:
            for raw in f:
                line = os.fsdecode(raw).strip()
                if line and not line.startswith("#"):
                    yield line
    except OSError as exc:
        raise ChestXrayError(f"{list_file}: cannot read this list file ({exc.strerror or exc})") from None


def dataset_paths(spec: str, split: str = "all", options: "DatasetOptions | None" = None) -> list[str]:
    """The image paths of a dataset root (`NAME:PATH` or an NIH path, as `evaluate` takes it)
    in one split ("all": every row), in the index's order. The index is read (its label
    files, no image decoded); only the paths are kept."""
    from chestxray.data.datasets import open_dataset

    index = open_dataset(spec, options)
    paths = index.frame["path"].to_numpy()[index.split_positions(split)]
    return [p for p in paths if isinstance(p, str)]  # None: listed but missing (with --allow-missing)


def iter_paths(
    paths: Iterable[str | os.PathLike], from_list: str | None = None, datasets: Sequence[Sequence[str]] = ()
) -> Iterator[str]:
    """Every input path, lazily: PATH arguments (files, folders, globs), then --from-list's
    lines (each may again be a file, folder or glob), then each dataset's image paths
    (`dataset_paths`)."""
    for p in paths:
        yield from _expand(os.fspath(p))
    if from_list is not None:
        for p in _read_list(from_list):
            yield from _expand(p)
    for dataset in datasets:
        yield from dataset


def iter_inputs(
    paths: Iterable[str | os.PathLike],
    from_list: str | None = None,
    shard: Shard = Shard(),
    datasets: Sequence[Sequence[str]] = (),
) -> Iterator[InputFile]:
    """This shard's files with their size and mtime; only the shard's own files are stat'ed."""
    for k, p in enumerate(iter_paths(paths, from_list, datasets)):
        if k % shard.count == shard.index:
            yield InputFile.of(p)


def count_inputs(
    paths: Iterable[str | os.PathLike],
    from_list: str | None = None,
    shard: Shard = Shard(),
    datasets: Sequence[Sequence[str]] = (),
) -> int | None:
    """How many files `iter_inputs` will give (a listing pass without stat, for the ETA);
    None when the list file is a pipe (it can be read only once)."""
    if from_list is not None and not list_is_rereadable(from_list):
        return None
    return sum(1 for k, _ in enumerate(iter_paths(paths, from_list, datasets)) if k % shard.count == shard.index)
