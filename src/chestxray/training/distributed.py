"""DistributedDataParallel plumbing for `torchrun --nproc_per_node N chestxray train ...`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def all_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def gather_rows(rows: np.ndarray, values: np.ndarray, n_total: int, info: DistInfo) -> np.ndarray:
    """Reassemble per-rank (row index, value) pieces into one (n_total, ...) array on every rank."""
    if not info.enabled:
        out = np.empty((n_total,) + values.shape[1:], dtype=values.dtype)
        out[rows] = values
        return out
    pieces: list = [None] * info.world_size
    dist.all_gather_object(pieces, (rows, values))
    out = np.empty((n_total,) + values.shape[1:], dtype=values.dtype)
    for r, v in pieces:
        out[r] = v
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
