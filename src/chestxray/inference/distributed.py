"""Process-group plumbing shared by training and inference under `torchrun`.

Lives on the inference floor, the lowest that uses it (sharded predict); training (DDP)
builds on it from above. torch is imported lazily: a single-process
run, and a torch-less ONNX install, never touch torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu", timeout_s: float | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment (if any): NCCL
    for CUDA devices, gloo otherwise. `timeout_s` bounds collective waits (torch's default
    when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None  # None: torch's default
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank, world, local, local_world)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(value: float, info: DistInfo, integer: bool = False) -> float:
    """Sum a number over all ranks (on every rank); exact for integers with `integer`."""
    if not info.enabled:
        return value
    import torch
    import torch.distributed as dist

    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64 if integer else torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_sum(value: int, info: DistInfo) -> int:
    """Sum an integer over all ranks (on every rank)."""
    return int(sum_over_ranks(value, info, integer=True))


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
