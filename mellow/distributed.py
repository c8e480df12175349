"""Rank detection (torchrun, SLURM) and process-group setup: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistributedContext:
    """Rank and world size from torchrun's variables, else SLURM's (one task per process), else a single process."""
    if "WORLD_SIZE" in os.environ:
        return DistributedContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                                  int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in os.environ:
        return DistributedContext(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                                  int(os.environ.get("SLURM_LOCALID", 0)))
    return DistributedContext(0, 1, 0)


def setup(device: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group if there is more than one process; return the context and this rank's device."""
    context = detect()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{context.local_rank}"
        torch.cuda.set_device(device)
    if context.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(context.rank))
        os.environ.setdefault("WORLD_SIZE", str(context.world_size))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                rank=context.rank, world_size=context.world_size)
    return context, torch.device(device)


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
