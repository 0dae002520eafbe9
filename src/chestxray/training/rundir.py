"""The run folder: refuse to clobber a run, turn write failures into one-line errors, and read
checkpoints without ever unpickling arbitrary objects."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chestxray.errors import ChestXrayError, OutputError
from chestxray.io import atomic_write

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.safetensors"
LOG_FILE = "log.jsonl"
BUNDLE = "model.safetensors"
CONFIG = "config.yaml"
LEGACY_CONFIG = "config.json"
TENSORBOARD_DIR = "tensorboard"
CURVES = "curves.png"
SUMMARY = "summary.md"
# A run folder's record, newest name first (config.json: runs made before config.yaml).
LEGACY_CONFIG_NAMES = (CONFIG, LEGACY_CONFIG)
# Everything a training run writes; what --overwrite clears and what marks a folder as a run.
RUN_FILES = (CHECKPOINT, BEST_WEIGHTS, LOG_FILE, BUNDLE, CONFIG, LEGACY_CONFIG, CURVES, SUMMARY)


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error behind a write failure: itself, or the `(os error N)` a SafetensorError quotes."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def _reason(exc: BaseException) -> str:
    exc = _os_error(exc) or exc
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on the device"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "permission denied" if exc.errno != errno.EROFS else "read-only file system"
        return exc.strerror or str(exc)
    return "the write failed (disk full or file system error?)"


def _is_write_failure(exc: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError from its zip writer (inline_container);
    # safetensors as a SafetensorError quoting the OS error.
    if type(exc).__name__ == "SafetensorError" and _os_error(exc) is not None:
        return True
    return isinstance(exc, OSError) or (
        isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "PytorchStreamWriter" in str(exc))
    )


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OS-level write failure under `path` into an OutputError naming the file."""
    try:
        yield
    except Exception as exc:
        if _is_write_failure(exc):
            raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
        raise


def save_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """`io.atomic_write` with write failures as OutputError; a failed write leaves the old file."""
    with writing(path):
        return atomic_write(path, write)


def save_text(path: Path, text: str) -> Path:
    return save_atomically(path, lambda p: p.write_text(text))


def run_config_file(run: Path) -> Path | None:
    """The record of the run in folder `run` (config.yaml, or an old run's config.json), if any."""
    return next((run / n for n in LEGACY_CONFIG_NAMES if (run / n).is_file()), None)


def run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that cannot hold a run, or that holds one that would be overwritten."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"out={str(out)!r} is a file, not a folder")
    found = run_files(out) if out.is_dir() else []
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise ChestXrayError(f"resume=True: no checkpoint at {out / CHECKPOINT}")
        return
    if found and not overwrite:
        raise OutputError(
            f"out={str(out)!r} already holds a training run ({', '.join(found)}); "
            "pass resume=True to continue it or overwrite=True to replace it"
        )
    # Find an unwritable parent now rather than after the data is loaded.
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"out={str(out)!r}: {parent} is a file, not a folder")


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (only those, never the rest of the folder)."""
    with writing(out):
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)


def make_out(out: Path) -> bool:
    """Create the run folder; True when this call created it (so an early failure may remove it)."""
    existed = out.is_dir()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        # Running as root, permission bits do not stop a write; os.access still tells the user case.
        if not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(out))
    return not existed


def remove_new_out(out: Path) -> None:
    """Undo `make_out` after an error before the first epoch finished: no empty or half run left."""
    shutil.rmtree(out, ignore_errors=True)


def read_checkpoint(path: Path, device: Any) -> dict[str, Any]:
    """torch.load with weights_only=True; any failure is one line naming the file. torch's own
    message is not passed on: for foreign pickles it suggests weights_only=False, which would
    run arbitrary code from the file."""
    import torch

    if not path.is_file():
        raise ChestXrayError(f"resume=True: no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise ChestXrayError(f"resume=True: {path} is empty (0 bytes); start again with overwrite=True")
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign file would precede the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        raise ChestXrayError(
            f"resume=True: {path} is not a readable chestxray checkpoint (truncated, corrupt or another "
            f"format; {size} bytes); start again with overwrite=True"
        ) from None
    needed = ("model", "optimizer", "epoch", "best_loss", "best_epoch", "history", "args")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ChestXrayError(f"resume=True: {path} is not a chestxray checkpoint (no {', '.join(missing)})")
    return state
