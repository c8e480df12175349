"""Is a store whole, and is its audio still what was encoded: the checks that turn two silent losses into one
clear line each.

- A shard file that is missing, cut short or emptied (a half-finished copy, a careless `rm`): zarr reads a chunk
  it cannot find as its fill value, so every clip of the shard would train as zeros without a word. Each shard's
  marker records the byte size of its files when it is committed (finalize gathers them into meta.json's
  `shard_bytes`); readers, `mellow store verify` and 01_precompute compare the files with it. A store made before
  sizes were recorded is checked by what it still has: a shard holding encoded clips must have its files, and a
  shard file must end in an index that passes its checksum.
- A clip whose audio file changed after 00_prepare hashed it, or after 01_precompute encoded it: each audio
  record carries the file's size and modification time (`bytes`, `mtime_ns`) beside its sha256, and the sha256 is
  recomputed only where they differ (or always, with --check-audio).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from mellow.files import read_json
from mellow.store.shards import (
    ChecksumError,
    ShardFileError,
    ShardLayoutError,
    check_layout,
    open_rows,
    read_chunk_index,
    read_with_zarr,
)

ARRAYS = ("emb", "valid")


REMEDY = "rerun 01_precompute on its dataset to recompute it, or copy the store again"


class DamagedStoreError(ValueError):
    """A store's shard file is missing, cut short or damaged; the message names the shard, its file and clips."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error reaches the training process as "Caught DamagedStoreError in DataLoader
        # worker process 0.\nOriginal Traceback ...\nmellow.integrity.DamagedStoreError: <message>": keep the line.
        if message.startswith("Caught ") and f"{type(self).__name__}: " in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[1]
        super().__init__(message)


class ShardFiles:
    """The files of a store's shards, and what to say when one is not what was committed."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = Path(store_path)
        self.metadata = {array: json.loads((self.store_path / "store.zarr" / array / "zarr.json").read_text())
                         for array in ARRAYS}

    def path(self, array: str, shard: int) -> Path:
        metadata = self.metadata[array]
        separator = metadata["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        key = separator.join(["c", str(shard)] + ["0"] * (len(metadata["shape"]) - 1))
        return self.store_path / "store.zarr" / array / key

    def named(self, array: str, shard: int) -> str:
        """How a message names a shard file: its path in the store, in parentheses."""
        return f"({self.path(array, shard).relative_to(self.store_path)})"

    def sizes(self, shard: int) -> dict[str, int]:
        """{array: bytes} of a shard's files as they are now (0: no file; zarr writes none for a shard of fill
        values, e.g. one whose every clip failed)."""
        return {array: self.path(array, shard).stat().st_size if self.path(array, shard).exists() else 0
                for array in ARRAYS}

    def problem(self, shard: int, committed: dict[str, int | None] | None, holds_encoded: bool) -> str | None:
        """What is wrong with a committed shard's files ("is missing", "is cut short (...)"), naming the file, or
        None. `committed`: {array: bytes} recorded at commit (None or a None size: not recorded, for stores made
        before sizes were); `holds_encoded`: whether the index calls any of its clips encoded."""
        for array in ARRAYS:
            expected = (committed or {}).get(array)
            path = self.path(array, shard)
            size = path.stat().st_size if path.exists() else None
            where = self.named(array, shard)
            if expected is not None:
                if expected and size is None:
                    return f"{where} is missing"
                if expected and size == 0:
                    return f"{where} is empty (0 of {expected:,} bytes)"
                if expected and size < expected:
                    return f"{where} is cut short ({size:,} of {expected:,} bytes)"
                if expected and size != expected:
                    return f"{where} is {size:,} bytes, not the {expected:,} it was written with"
                continue
            if size is None:
                if holds_encoded:
                    return f"{where} is missing"
                continue
            if array == "emb" and not _index_intact(path, self.metadata[array]):
                return f"{where} is cut short or damaged (its chunk index fails its checksum)"
        return None

    def describe(self, shard: int, problem: str, remedy: str = REMEDY) -> str:
        """The one line every reader and `store verify` gives for a damaged shard: the shard, its file, what is
        wrong, its clips (from its marker), and what to do."""
        marker = self.store_path / "parts" / f"shard-{shard:05d}.json"
        records = read_json(marker)["records"] if marker.is_file() else []
        clips = ""
        if records:
            ids = [record["id"] for record in records]
            shown = ", ".join(ids[:2]) + (f" … {ids[-1]}" if len(ids) > 3 else "".join(f", {i}" for i in ids[2:]))
            clips = f": it holds {len(ids)} clips, {shown} (rows {records[0]['row']}-{records[-1]['row']})"
        return f"shard {shard} of {self.store_path} {problem}{clips}; {remedy}"


def _index_intact(path: Path, metadata: dict) -> bool:
    """Whether a shard file ends in its chunk index and that index's crc32c (as the Zarr v3 sharding codec writes
    it): a file cut short or grown ends in other bytes."""
    try:
        _, chunks = check_layout(metadata)
    except ShardLayoutError:
        return True  # not a layout whose index is read here; zarr checks it when it reads
    descriptor = os.open(path, os.O_RDONLY)
    try:
        read_chunk_index(descriptor, chunks, path, 0)
        return True
    except (ShardFileError, ChecksumError):
        return False
    finally:
        os.close(descriptor)


def committed_shards(path: Path) -> tuple[list[int], int]:
    """(the shards whose marker is written, how many shards the store has) of a store, finished or not."""
    meta = read_json(path / "meta.json")
    total = -(-meta["rows"] // meta["clips_per_shard"])
    return [shard for shard in range(total) if (path / "parts" / f"shard-{shard:05d}.json").exists()], total


def is_finalized(meta: dict) -> bool:
    """Whether finalize wrote the store's index (complete: and accepted it; stores made before the two were told
    apart have only `complete`)."""
    return bool(meta.get("finalized", meta.get("complete")))


def verify_store(path: Path) -> list[tuple[int | None, str]]:
    """Check that every committed shard's files are there and as long as they were written, that every row the
    index calls encoded holds data whose checksum passes, and the index's rows; (the shard it is in, or None for
    the store's index, one line) per problem (empty: all good).

    A store that precompute has not finished (interrupted, or stopped by a full disk) is checked shard by shard
    for what it committed: every shard with a marker must read back; the others are rewritten by the next run.
    Each shard is read whole (straight from its file where the layout allows, else through zarr); a shard that
    fails is read clip by clip, so a damaged chunk is named by clip id. Records are streamed, a shard at a time.
    """
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not an embedding store (no meta.json)")
    meta = read_json(path / "meta.json")
    group = zarr.open_group(path / "store.zarr", mode="r")
    emb, valid = group["emb"], group["valid"]
    files = ShardFiles(path)
    problems = []
    shards, total = committed_shards(path)
    if is_finalized(meta):
        problems.extend((shard, f"shard {shard} has no commit marker (parts/shard-{shard:05d}.json), though the "
                                f"store is finalized; {REMEDY}") for shard in sorted(set(range(total)) - set(shards)))
        with open(path / "index.jsonl") as handle:
            rows = np.fromiter((json.loads(line)["row"] for line in handle if line.strip()), dtype=np.int64)
        if not np.array_equal(np.sort(rows), np.arange(meta["rows"])):
            problems.append((None, f"index.jsonl lists rows {len(rows)} for a store of {meta['rows']} rows; rerun "
                                   "01_precompute (or `mellow store finalize`) to write it again"))
    encoded = np.zeros(meta["rows"], dtype=bool)  # filled a shard at a time, from its marker
    reader = open_rows(path / "store.zarr" / "emb", required=encoded)
    read = reader.read if reader else functools.partial(read_with_zarr, emb)
    per_shard = meta["clips_per_shard"]
    for shard in shards:
        records = read_json(path / "parts" / f"shard-{shard:05d}.json")
        encoded[[record["row"] for record in records["records"] if record["status"] == "ok"]] = True
        start, stop = shard * per_shard, min((shard + 1) * per_shard, meta["rows"])
        problem = files.problem(shard, records.get("files"), bool(encoded[start:stop].any()))
        if problem is None:
            problem = _chunk_problems(read, valid, files, shard, range(start, stop), records["records"])
        if problem:
            problems.extend((shard, line) for line in ([files.describe(shard, problem)] if isinstance(problem, str)
                                                       else problem))
    return problems


def _chunk_problems(read: Callable, valid: zarr.Array, files: ShardFiles, shard: int, rows: range,
                    records: list[dict]) -> str | list[str]:
    """What reading a shard's rows finds: nothing, a problem of its file, or one line per damaged clip."""
    try:
        read(np.arange(rows.start, rows.stop))
        valid[rows.start : rows.stop]
        return []
    except ShardFileError as error:
        return f"{files.named('emb', shard)} {error.problem}"
    except Exception:  # any codec or checksum error: find the clips it hits
        pass
    ids = {record["row"]: record["id"] for record in records}
    damaged = []
    for row in rows:
        try:
            read(np.array([row]))
            valid[row]
        except Exception as error:
            damaged.append(f"clip {ids.get(row, '?')} (row {row}) in shard {shard} {files.named('emb', shard)}: "
                           f"{type(error).__name__}: {error}; `mellow store verify --repair` takes the shard back "
                           "for 01_precompute to compute again")
    return damaged

