"""What the audio and caption precompute stages share: a sharded job's result, and its report, which
finalizes the store when this process finished its last shard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mellow.progress import console
from mellow.settings import ShardedJobConfig
from mellow.store.integrity import is_finalized
from mellow.store.writer import FINALIZE_LOCK, StoreWriter, check_failures, finalize_store


@dataclass
class PrecomputeResult:
    store_path: Path
    computed_shards: int
    skipped_shards: int
    clips: int
    seconds: float


def report(config: ShardedJobConfig, writer: StoreWriter, result: PrecomputeResult) -> None:
    """Print what this process did. Exactly one process finalizes the store: the one that finds every shard
    done and gets the finalize lock first; the others leave it to that one."""
    rank, world = config.work_split()
    who, rows = f"rank {rank}/{world}: " if world > 1 else "", config.rows_are
    rate = result.clips / result.seconds if result.seconds else 0.0
    done = f"{result.computed_shards} shard(s) computed, {result.skipped_shards} already done; " \
           f"{result.clips} {rows} in {result.seconds:.1f} s ({rate:.1f} {rows}/s)"
    counts = None
    if writer.all_done():
        with writer.exclusive(FINALIZE_LOCK) as claimed:
            if claimed and not writer.read_meta()["complete"]:
                counts = finalize_store(writer, config.dataset, result.seconds, config.max_failures)
    if counts is None:
        meta = writer.read_meta()
        if not is_finalized(meta):
            console.print(f"[bold green]{who}finished its shards[/] of {result.store_path}: {done}. The last "
                          f"process to finish finalizes the store (or run `mellow store finalize "
                          f"{result.store_path}`).")
            return
        counts = meta["counts"]
        console.print(f"[bold green]{who}finished[/]: {done}; {result.store_path} is finalized: {counts['ok']} "
                      f"{rows} ok, {counts['failed']} failed")
    else:
        quiet, console.quiet = console.quiet, False  # whichever rank finalizes says so, not only rank 0
        try:
            console.print(f"[bold green]{who}precomputed[/] {result.store_path}: {counts['ok']} {rows} ok, "
                          f"{counts['failed']} failed; {done}")
        finally:
            console.quiet = quiet
    check_failures(writer.path, counts, config.max_failures, config.rows_are)

