"""DistributedDataParallel plumbing for `torchrun --nproc_per_node N chestxray train ...`."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

# The process-group helpers live on the inference floor so that sharded predict shares them.
from chestxray.inference.distributed import DistInfo, barrier, init_distributed, shutdown, sum_over_ranks

__all__ = ["DistInfo", "all_mean", "barrier", "gather_rows", "init_distributed", "shutdown"]


def all_mean(value: float, info: DistInfo) -> float:
    return float(sum_over_ranks(value, info)) / info.world_size


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
