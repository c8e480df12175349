"""Rank detection (torchrun, SLURM) and process-group setup: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mellow.errors import PeerLostError


def resolve_device(name: str) -> str:
    """A --device setting made concrete: auto is cuda when a GPU is visible, else cpu; others are kept."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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


def setup(device: str, timeout_seconds: float = 900.0) -> tuple[DistributedContext, torch.device]:
    """Join the process group if there is more than one process; return the context and this rank's device.
    A collective that waits longer than `timeout_seconds` for another process fails instead of hanging."""
    context = detect()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:") and context.world_size > 1:
        raise ValueError(f"device {device} pins one GPU for all {context.world_size} processes; use cuda, which "
                         "gives each process the GPU of its local rank")
    if device == "cuda":
        device = f"cuda:{context.local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if context.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(context.rank))
        os.environ.setdefault("WORLD_SIZE", str(context.world_size))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=context.rank,
                                world_size=context.world_size, timeout=timedelta(seconds=timeout_seconds))
    return context, torch.device(device)


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def raise_if_peer_lost(error: RuntimeError, context: DistributedContext, what_next: str) -> None:
    """Turn a collective's failure in a multi-process run into one clear PeerLostError (the original error,
    a page of backend detail, stays chained)."""
    if context.world_size > 1 and _looks_like_peer_loss(error):
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise PeerLostError(f"rank {context.rank}: another process of this {context.world_size}-process run died "
                            f"or stopped answering ({first_line}); {what_next}") from error


def _looks_like_peer_loss(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, dist.DistError) or any(sign in text for sign in (
        "connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

