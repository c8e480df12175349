"""The shared rich console and progress bar (quiet on ranks other than 0)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


console = Console(quiet=not _is_rank_zero(), soft_wrap=True)  # long paths stay on one line


class StageProgress(Progress):
    """A rich Progress whose tasks carry a free-form `status` text (throughput, loss, ...)."""

    def add_task(self, description: str, *args, status: str = "", **kwargs) -> int:  # type: ignore[override]
        return super().add_task(description, *args, status=status, **kwargs)


def progress_bar(transient: bool = False) -> StageProgress:
    return StageProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}", justify="right"), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(),
        console=console, transient=transient, disable=not _is_rank_zero(),
    )
