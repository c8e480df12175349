"""Where training metrics go: metrics.jsonl always, TensorBoard event files, and Weights & Biases when asked.
Only rank 0 writes. A resumed run first drops what a killed run logged past its checkpoint, so every sink shows
each update once.

W&B is asked for by `--train.wandb on`, or (with the default `auto`) by the environment: a W&B API key
(WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes) or WANDB_MODE (`disabled` keeps it off). It runs in
WANDB_MODE's mode, else online when there is a key, else offline: an offline run lies in <run_dir>/wandb/ and
uploads later with `wandb sync <run_dir>/wandb/offline-run-*`. A resumed run continues the same W&B run (its id
is kept in <run_dir>/wandb-id).
"""

from __future__ import annotations

import json
import netrc
import os
import resource
import secrets
import time
from pathlib import Path

import torch

from mellow.files import disk_space, read_jsonl, write_jsonl_atomic, write_text_atomic
from mellow.progress import console


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Tracker:
    """Logs one record (a dict with an `update` key) to every sink; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, resolved: dict, is_main: bool, resumed_at: int, tensorboard: bool,
                 wandb_setting: str, wandb_project: str) -> None:
        """`resumed_at`: the update the run continues from (0 for a run that starts from nothing); what a killed
        run logged after it is dropped, so every sink shows each update once."""
        self.metrics_path = run_dir / "metrics.jsonl"
        self.enabled = is_main
        self.tensorboard = None
        self.wandb = None
        if not is_main:
            return
        if self.metrics_path.exists():
            write_jsonl_atomic(self.metrics_path, [r for r in read_jsonl(self.metrics_path)
                                                   if r["update"] <= resumed_at])
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its checkpoint
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_at + 1)
        self.wandb = start_wandb(run_dir, resolved, wandb_setting, wandb_project)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({**record, "time": time.time()}) + "\n"
        with disk_space(self.metrics_path.parent, self.metrics_path.name, len(line)):
            with open(self.metrics_path, "a") as handle:
                handle.write(line)
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


def wandb_key_present() -> bool:
    """Whether this machine holds a W&B API key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str | None:
    """The W&B mode to run in (online/offline/...), or None for no W&B: see the module's docstring."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if setting == "off":
        return None
    if setting == "auto" and (mode == "disabled" or (not mode and not wandb_key_present())):
        return None
    return mode or ("online" if wandb_key_present() else "offline")


def start_wandb(run_dir: Path, resolved: dict, setting: str, project: str):
    """A W&B run (resumed if this run had one), or None when not asked for or, with `auto`, unavailable."""
    mode = wandb_mode(setting)
    if mode is None:
        return None
    try:
        import wandb
    except ImportError:
        if setting == "on":
            raise ValueError("--train.wandb on needs the wandb package: uv add wandb (or use auto/off)") from None
        console.print("[yellow]W&B was asked for by the environment (an API key or WANDB_MODE) but the wandb "
                      "package is not installed; training goes on without it")
        return None
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    write_text_atomic(id_file, run_id + "\n")
    try:
        return wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                          config=resolved, mode=mode)
    except Exception as error:  # e.g. online mode without network: train on, without W&B, unless asked for
        if setting == "on":
            raise
        console.print(f"[yellow]W&B could not start ({type(error).__name__}); training goes on without it. "
                      "Set --train.wandb off to not try, or WANDB_MODE=offline")
        return None

