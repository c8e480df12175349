"""Under torchrun, a stage's one-line error is the last thing the user reads.

A stage that stops on a bad input prints `error: ...` and writes it to torchrun's error file; torchrun's launcher
then raises ChildFailedError, and Python prints its traceback and failure report (~35 lines) after the one line
that matters. mellow_torchrun.pth (installed with mellow) sets a sys.excepthook in every interpreter of the
environment that imports nothing; only when an uncaught ChildFailedError reaches it does it import this module,
whose `report` changes the report of a ChildFailedError whose first failure is such a mellow error: one line
naming the rank and exit code and repeating the error, and the process's exit code is the stage's (2 for a bad
input) instead of 1. A child that crashed (a traceback, a signal) keeps torchrun's full report.
"""

from __future__ import annotations

import os
import sys


def report(kind: type, error: BaseException, traceback, previous) -> None:
    """The excepthook's work: torchrun's ChildFailedError of a mellow error as one line; anything else to
    `previous` (the hook that was there before)."""
    first = getattr(error, "get_first_failure", None)
    if kind.__name__ != "ChildFailedError" or first is None:
        return previous(kind, error, traceback)
    rank, failure = first()
    message = failure.message if isinstance(failure.message, str) else ""
    if not message.startswith("error: ") or failure.exitcode <= 0:
        return previous(kind, error, traceback)
    failed = len(getattr(error, "failures", {})) or 1
    print(f"torchrun: {failed} process(es) failed; rank {rank} exited with code {failure.exitcode}: {message}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(failure.exitcode)
