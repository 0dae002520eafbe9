"""The one device policy: what `--device` accepts and what it resolves to."""

from __future__ import annotations

import re

from chestxray.errors import ChestXrayError

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """Syntax only (no torch import): for argparse and torch-free paths."""
    if not _PATTERN.match(name):
        raise ChestXrayError(f"device={name!r}: expected {DEVICE_HELP}")
    return name


def resolve_device(name: str = "auto") -> str:
    """ "auto" -> "cuda" or "cpu"; "cuda[:N]" checked to exist, with a clean error if not."""
    check_device_name(name)
    if name == "cpu":
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ChestXrayError(f"device={name!r}: no CUDA device is available here; use device='cpu' or 'auto'")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ChestXrayError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
