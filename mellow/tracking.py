"""Where training metrics go: metrics.jsonl always, TensorBoard event files, and Weights & Biases when the
wandb package is installed. Only rank 0 writes. A resumed run first drops what a killed run logged past its
checkpoint, so every sink shows each update once.

W&B runs offline unless WANDB_MODE says otherwise (`WANDB_MODE=online` after `wandb login`); an offline run
lies in <run_dir>/wandb/ and uploads later with `wandb sync <run_dir>/wandb/offline-run-*`. A resumed run
continues the same W&B run (its id is kept in <run_dir>/wandb-id).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import time
from pathlib import Path

import torch

from mellow.files import read_jsonl, write_jsonl_atomic, write_text_atomic
from mellow.progress import console


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Tracker:
    """Logs one record (a dict with an `update` key) to every sink; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, resolved: dict, is_main: bool, resumed_at: int | None, tensorboard: bool,
                 wandb_mode: str, wandb_project: str) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.enabled = is_main
        self.tensorboard = None
        self.wandb = None
        if not is_main:
            return
        if resumed_at is not None and self.metrics_path.exists():
            write_jsonl_atomic(self.metrics_path, [r for r in read_jsonl(self.metrics_path)
                                                   if r["update"] <= resumed_at])
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its checkpoint
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"),
                                             purge_step=resumed_at + 1 if resumed_at is not None else None)
        self.wandb = start_wandb(run_dir, resolved, wandb_mode, wandb_project)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({**record, "time": time.time()}) + "\n")
        update = record["update"]
        numbers = {key: value for key, value in record.items()
                   if key != "update" and isinstance(value, int | float)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, update)
        if self.wandb is not None:
            self.wandb.log(numbers, step=update)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path, resolved: dict, mode: str, project: str):
    """A W&B run (resumed if this run had one), or None when off or, with `auto`, unavailable."""
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "on":
            raise ValueError("--train.wandb on needs the wandb package: uv add wandb (or use auto/off)") from None
        return None
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    write_text_atomic(id_file, run_id + "\n")
    try:
        return wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                          config=resolved, mode=os.environ.get("WANDB_MODE", "offline"))
    except Exception as error:  # e.g. online mode without a login: train on, without W&B, unless asked for
        if mode == "on":
            raise
        console.print(f"[yellow]W&B is installed but could not start ({type(error).__name__}); training goes on "
                      "without it. Set --train.wandb off to not try, or WANDB_MODE=offline")
        return None
