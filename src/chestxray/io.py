"""Atomic file writes: a temp file in the same folder, then rename."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path over `path`; no torn files on a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | os.PathLike) -> None:
    """Raise ChestXrayError unless a file can be written at `path`: checked by creating and
    removing a temporary file in its folder, or in the nearest existing folder above a missing
    one (nothing is left behind), before long work whose result would otherwise be lost."""
    _check_place(Path(path), Path(path).parent)


def check_output_folder(path: str | os.PathLike) -> None:
    """Raise ChestXrayError unless files can be written in the folder `path` (made later if
    missing): not a file, and writable as `check_writable` checks it."""
    from chestxray.errors import ChestXrayError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChestXrayError(f"{path}: is a file, not a folder")
    _check_place(path, path)


def _check_place(path: Path, folder: Path) -> None:
    from chestxray.errors import ChestXrayError

    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ChestXrayError(f"{path}: cannot write here ({exc.strerror or type(exc).__name__})") from None


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` without anchors and aliases: a few hundred bytes of nested aliases (a
    "billion laughs") expand to gigabytes wherever the value is copied or printed, and a
    settings file never needs them. Raises ValueError on an alias, yaml.YAMLError on bad YAML."""
    import yaml

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f"YAML aliases (*name) are not allowed (line {mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_NoAliases)  # a SafeLoader subclass: no python tags
