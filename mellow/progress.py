"""The shared rich console and progress bar (quiet on ranks other than 0)."""

from __future__ import annotations

import datetime
import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Where the output is not a terminal (a SLURM log, a file, a pipe) a progress bar cannot redraw: a plain line
# says where the work is every this many seconds instead.
LOG_SECONDS = float(os.environ.get("MELLOW_LOG_SECONDS", "30"))


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


console = Console(quiet=not _is_rank_zero(), soft_wrap=True)  # long paths stay on one line


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


class StageProgress(Progress):
    """A rich Progress whose tasks carry a free-form `status` text (throughput, loss, ...); on a console that
    is not a terminal it prints a plain progress line every LOG_SECONDS instead of a bar."""

    def __init__(self, *columns, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._plain = not self.console.is_terminal and not self.disable
        self._last_line = time.monotonic()

    def add_task(self, description: str, *args, status: str = "", **kwargs) -> int:  # type: ignore[override]
        return super().add_task(description, *args, status=status, **kwargs)

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._log_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id) -> None:
        if not self._plain or time.monotonic() - self._last_line < LOG_SECONDS:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        total = "?" if task.total is None else f"{task.total:.0f}"
        status = f" {task.fields['status']}," if task.fields.get("status") else ""
        self.console.print(f"{task.description} {task.completed:.0f}/{total}:{status} elapsed "
                           f"{_duration(task.elapsed)}, eta {_duration(task.time_remaining)}", markup=False,
                           highlight=False)


def progress_bar(transient: bool = False) -> StageProgress:
    return StageProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}", justify="right"), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(),
        console=console, transient=transient, disable=not _is_rank_zero(),
    )

