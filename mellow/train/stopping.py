"""When a training run stops early: Ctrl-C, preemption signals, time limits, and SLURM requeue.

A signal handler only sets a flag (SIGINT: Ctrl-C; SIGTERM, SIGUSR1; SLURM's `--signal=USR1@120` sends one before
the time limit; where the job's end time is known, USR1 is left to the deadline check, see StopControl). At every
update boundary all ranks agree on stopping (one all-reduce of the flag), so they save the same checkpoint
together and exit cleanly. A second Ctrl-C quits at once, without saving. The time limit (`--train.time_limit`,
and the SLURM job's end time
when there is one) stops the run early enough to save: before each update, the time an update takes (a
running average) plus the time a save takes (measured) plus a margin must still fit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from rich.markup import escape

from mellow.progress import console

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


TIME_LIMIT, SIGNAL, INTERRUPT = 1, 2, 3  # reasons to stop, agreed across ranks by their maximum (Ctrl-C wins: the


# user asked to stop, so a SLURM job is not requeued)
# A terminal sends Ctrl-C to every process of the foreground group, and torchrun forwards the SIGINT it got to its
# workers as well: a worker sees one press twice within milliseconds. Only a SIGINT this much later is a second one.
SAME_PRESS_SECONDS = 1.0


def slurm_end_time() -> float | None:
    """The SLURM job's end time (seconds since the epoch), or None outside SLURM or if it cannot be read.

    SLURM_JOB_END_TIME (set by recent SLURM versions) first, else `squeue -h -j $SLURM_JOB_ID -o %e`."""
    if "SLURM_JOB_END_TIME" in os.environ:
        return float(os.environ["SLURM_JOB_END_TIME"])
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        answer = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        return datetime.fromisoformat(answer).timestamp()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class StopControl:
    """Decides, the same way on every rank, whether to stop after the current update, and why."""

    def __init__(self, started: float, time_limit: float, use_slurm_end: bool, margin: float,
                 device: torch.device) -> None:
        """`started`: when the invocation began (the time limit counts from it)."""
        deadlines = [started + time_limit] if time_limit else []
        slurm_end = slurm_end_time() if use_slurm_end else None
        if slurm_end is not None:
            deadlines.append(slurm_end)
        self.deadline = min(deadlines) if deadlines else None
        # SIGUSR1 is SLURM's warning before the time limit (--signal=USR1@N). Where the job's end time is known,
        # the deadline check already stops in time, and the warning is redundant: for a job shorter than N
        # seconds SLURM sends it at every start, which would stop every start at its first update.
        self.usr1_is_warning_only = slurm_end is not None
        self.margin = margin
        self.device = device
        self.signal_name: str | None = None
        self.interrupted_at: float | None = None  # when the first Ctrl-C came
        self.preempted = False  # stopped for a signal or a time limit (not planned), so a SLURM job requeues
        self.interrupted = False  # stopped for Ctrl-C (on any rank)
        self.update_seconds: float | None = None  # running average of one update (with its logging)
        self.save_seconds: float | None = None  # the slowest save so far
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> StopControl:
        for number in STOP_SIGNALS:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)

    def _on_signal(self, number: int, frame) -> None:
        if number == signal.SIGUSR1 and self.usr1_is_warning_only:
            return
        if number == signal.SIGINT:
            now = time.monotonic()
            if self.interrupted_at is not None:
                if now - self.interrupted_at < SAME_PRESS_SECONDS:
                    return
                self._say("second Ctrl-C: quitting now, without saving; --resume continues from the last checkpoint")
                raise KeyboardInterrupt
            self.interrupted_at = now
            self._say("Ctrl-C: stopping after this update, saving first (Ctrl-C again to quit at once, without "
                      "saving)")
        self.signal_name = signal.Signals(number).name  # only a flag: the loop saves at the next boundary

    @staticmethod
    def _say(line: str) -> None:
        """A line from a signal handler: written straight to stderr (rank 0 only), not through rich's console,
        whose lock the interrupted code may hold."""
        if not console.quiet:
            os.write(2, f"\n{line}\n".encode())

    def update_took(self, seconds: float) -> None:
        self.update_seconds = seconds if self.update_seconds is None else 0.9 * self.update_seconds + 0.1 * seconds

    def save_took(self, seconds: float) -> None:
        self.save_seconds = max(self.save_seconds or 0.0, seconds)

    def _local_reason(self, extra_seconds: float) -> tuple[int, str] | None:
        if self.signal_name:
            return INTERRUPT if self.signal_name == "SIGINT" else SIGNAL, f"received {self.signal_name}"
        if self.deadline is None or self.update_seconds is None:
            return None
        save = self.save_seconds if self.save_seconds is not None else 3 * self.update_seconds + 1.0
        needed = self.update_seconds + extra_seconds + save + self.margin
        if time.time() + needed > self.deadline:
            left = self.deadline - time.time()
            return TIME_LIMIT, f"time limit: {left:.0f} s left, one more update and a save need about {needed:.0f} s"
        return None

    def reason_to_stop(self, extra_seconds: float = 0.0) -> str | None:
        """Why to stop now, or None; every rank gets the same answer (a signal on any rank stops them all).
        `extra_seconds`: other work the next update brings (a validation)."""
        local = self._local_reason(extra_seconds)
        kind = local[0] if local else 0
        if dist.is_initialized():
            agreed = torch.tensor([kind], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            kind = int(agreed.item())
        if kind == 0:
            return None
        self.interrupted = kind == INTERRUPT
        self.preempted = not self.interrupted
        if local and local[0] == kind:
            return local[1]
        return {SIGNAL: "another rank received a stop signal", INTERRUPT: "Ctrl-C (on another rank)",
                TIME_LIMIT: "time limit (on another rank)"}[kind]


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue, so it continues with --resume when it runs again.

    `scontrol requeue` ends the job's processes at once. Under a launcher that outlives this process (torchrun in
    stages/slurm/train.sbatch) that would kill the launcher mid-exit, so such a launcher sets MELLOW_REQUEUE_FILE:
    this writes the job id there, and the launcher requeues once every process has ended."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    request = os.environ.get("MELLOW_REQUEUE_FILE")
    if request:
        Path(request).write_text(job + "\n")
        console.print(f"SLURM job {job} is to be requeued (asked its launcher through {request}); "
                      "it continues from the checkpoint when it starts again")
        return
    command = ["scontrol", "requeue", job]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        console.print(f"[yellow]could not requeue SLURM job {job}:[/] {escape(str(error))}")
        return
    if completed.returncode == 0:
        console.print(f"requeued SLURM job {job}; it continues from the checkpoint when it starts again")
    else:
        detail = escape(completed.stderr.strip()) or f"exit code {completed.returncode}"
        console.print(f"[yellow]`{' '.join(command)}` failed:[/] {detail}")

