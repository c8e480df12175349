"""Rows of the store's `emb` array read straight from its shard files, for the training data path.

zarr's `get_orthogonal_selection` pays a fixed cost per chunk that dominates with one chunk per clip: 291 rows/s
for random 64-row batches of 129 x 768 float16 rows on 2 cores, a tenth of what the disk and zstd allow. The
format is simple enough to read by hand (written by zarr, documented in the Zarr v3 sharding spec): a shard file
is the encoded chunks followed by an index of (offset, nbytes) uint64 pairs, one per chunk, ending in the
index's crc32c; each chunk is zstd(little-endian bytes) followed by its crc32c. So a read is: the shard's index
(once per process), one `os.pread` per run of neighbouring chunks, and checksum + zstd decode per chunk, split
over a few threads (numcodecs' zstd releases the GIL). Nothing is written: stock zarr still reads and writes
every store, and an array laid out any other way is read through zarr (`open_rows`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import zstd

EMPTY = np.uint64(2**64 - 1)  # offset and nbytes of a chunk that was never written (it reads as fill_value)


MAX_GAP = 1 << 16  # neighbouring chunks less than this many bytes apart are fetched in one read,


MAX_SPAN = 1 << 22  # of at most this many bytes (larger reads only add page faults)


# Below this many decoded bytes a read stays on one thread: for 64 rows of 16 x 384 (0.8 MB) the second thread
# cost more than it gave (15 100 vs 20 200 rows/s, benchmarks/scale.py); for 64 rows of 129 x 768 it doubles.
MIN_THREADED_BYTES = 1 << 21


class ShardLayoutError(ValueError):
    """The array is not laid out the way ShardedRows reads (zarr can still read it)."""


class ChecksumError(ValueError):
    """A chunk or shard index does not match its crc32c: the file was damaged after it was written."""


class ShardFileError(ValueError):
    """A shard file is missing, cut short, or lacks a row that must be there (the store layer names its clips)."""

    def __init__(self, path: Path, shard: int, problem: str) -> None:
        self.shard, self.problem = shard, problem
        super().__init__(f"{path} {problem}")


def check_layout(metadata: dict) -> tuple[tuple[int, ...], int]:
    """(row shape, rows per shard) of a sharded array with one chunk per row, bytes(little) -> zstd -> crc32c
    inside and bytes(little) -> crc32c for an index at the end; ShardLayoutError for anything else."""
    codecs = metadata.get("codecs", [])
    if metadata.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        raise ShardLayoutError("not a Zarr v3 array with the sharding codec alone")
    sharding = codecs[0]["configuration"]
    inner = [codec["name"] for codec in sharding["codecs"]]
    index = [codec["name"] for codec in sharding["index_codecs"]]
    little = all(codec.get("configuration", {}).get("endian", "little") == "little"
                 for codec in sharding["codecs"] + sharding["index_codecs"] if codec["name"] == "bytes")
    if inner != ["bytes", "zstd", "crc32c"] or index != ["bytes", "crc32c"] or not little:
        raise ShardLayoutError(f"codecs {inner} / index {index} are not bytes -> zstd -> crc32c / bytes -> crc32c")
    if sharding.get("index_location", "end") != "end" or metadata["chunk_key_encoding"]["name"] != "default":
        raise ShardLayoutError("the shard index is not at the end of the file, or chunk keys are not default")
    shape, chunk = metadata["shape"], sharding["chunk_shape"]
    shard = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    if chunk[0] != 1 or list(chunk[1:]) != list(shape[1:]) or list(shard[1:]) != list(shape[1:]):
        raise ShardLayoutError(f"chunks {chunk} / shards {shard} are not whole rows of an array of shape {shape}")
    return tuple(shape[1:]), shard[0]


def read_chunk_index(descriptor: int, chunks: int, path: Path, shard: int) -> np.ndarray:
    """The (chunks, 2) uint64 (offset, nbytes) table that ends a shard file, after its crc32c is checked: a file
    cut short or grown ends in other bytes. ShardFileError when the file is shorter than the table, ChecksumError
    when the table's checksum fails."""
    size = chunks * 16 + 4
    length = os.fstat(descriptor).st_size
    if length < size:
        raise ShardFileError(path, shard, f"is cut short ({length:,} bytes, less than its own chunk index)")
    raw = os.pread(descriptor, size, length - size)
    if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ChecksumError(f"{path}: the shard index fails its crc32c checksum (damaged or truncated file); run "
                            "`mellow store verify`")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)


class ShardedRows:
    """Reads whole rows of one sharded Zarr v3 array (the store's `emb`) by index, with identical values to
    `zarr.open(...)[rows]`, several times faster. Safe to use from one process at a time; a forked process
    (DataLoader worker) opens its own files and threads on first use.

    Where zarr reads a chunk it cannot find as its fill value, this refuses (ShardFileError) a shard file that
    is not as long as `shard_bytes` says (its size per shard when it was written; None: not known) and a row
    that `required` ((rows,) bool: the rows that hold data) says must be there."""

    def __init__(self, array_path: Path, threads: int = 2, shard_bytes: list[int | None] | None = None,
                 required: np.ndarray | None = None) -> None:
        self.path = Path(array_path)
        metadata = json.loads((self.path / "zarr.json").read_text())
        self.row_shape, self.rows_per_shard = check_layout(metadata)
        self.num_rows = metadata["shape"][0]
        self.dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        self.fill_value = metadata["fill_value"]
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.separator = metadata["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.threads = threads
        self.shard_bytes, self.required = shard_bytes, required
        self._pid: int | None = None

    def _open_for_this_process(self) -> None:
        """File descriptors, shard indexes and a thread pool belong to one process; a fork starts afresh."""
        self._pid = os.getpid()
        self._files: dict[int, int] = {}
        self._indexes: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def shard_path(self, shard: int) -> Path:
        key = self.separator.join(["c", str(shard)] + ["0"] * len(self.row_shape))
        return self.path / key

    def _expected_bytes(self, shard: int) -> int | None:
        return self.shard_bytes[shard] if self.shard_bytes is not None and shard < len(self.shard_bytes) else None

    def _file(self, shard: int) -> int | None:
        if shard not in self._files:
            expected = self._expected_bytes(shard)
            try:
                descriptor = os.open(self.shard_path(shard), os.O_RDONLY)
            except FileNotFoundError:  # a shard of fill values only is never written (as zarr has it)
                if expected:
                    raise ShardFileError(self.shard_path(shard), shard, "is missing") from None
                return None
            size = os.fstat(descriptor).st_size
            if expected is not None and size != expected:
                os.close(descriptor)
                raise ShardFileError(self.shard_path(shard), shard, f"is {size:,} bytes, not the {expected:,} it "
                                                                   "was written with")
            self._files[shard] = descriptor
        return self._files[shard]

    def _index(self, shard: int, descriptor: int) -> np.ndarray:
        """The shard's (rows_per_shard, 2) uint64 (offset, nbytes) table, read once per process."""
        if shard not in self._indexes:
            self._indexes[shard] = read_chunk_index(descriptor, self.rows_per_shard, self.shard_path(shard), shard)
        return self._indexes[shard]

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def chunk_table(self, shard: int) -> np.ndarray:
        """(rows_per_shard, 2) uint64 offset and byte count of every chunk of `shard` (EMPTY: never written)."""
        if self._pid != os.getpid():
            self._open_for_this_process()
        descriptor = self._file(shard)
        if descriptor is None:
            return np.full((self.rows_per_shard, 2), EMPTY)
        return self._index(shard, descriptor)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order, repeats allowed) as one (len(rows), *row_shape) array."""
        if self._pid != os.getpid():
            self._open_for_this_process()
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside 0..{self.num_rows - 1} of {self.path}")
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        jobs = []  # (position in out, row, encoded bytes) of every chunk to decode
        for shard in np.unique(rows // self.rows_per_shard):
            positions = np.flatnonzero(rows // self.rows_per_shard == shard)
            jobs.extend(self._fetch(int(shard), positions, rows[positions] - shard * self.rows_per_shard))
        unwritten = np.ones(len(rows), dtype=bool)
        unwritten[[position for position, _, _ in jobs]] = False
        if self.required is not None and (self.required[rows] & unwritten).any():
            row = int(rows[self.required[rows] & unwritten][0])
            shard = row // self.rows_per_shard
            problem = ("is missing" if self._file(shard) is None else
                       f"has no data for row {row}, which the index lists as encoded")
            raise ShardFileError(self.shard_path(shard), shard, problem)
        out[unwritten] = self.fill_value
        if self._pool is None or len(jobs) * self.row_bytes < MIN_THREADED_BYTES:
            self._decode(jobs, out)
        else:  # one task per thread: a task per chunk would cost more to schedule than small rows take to decode
            list(self._pool.map(self._decode, [jobs[i :: self.threads] for i in range(self.threads)],
                                [out] * self.threads))
        return out

    def _fetch(self, shard: int, positions: np.ndarray,
               locals_: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Read the chunks of rows `locals_` of one shard, neighbouring ones in one `pread`."""
        descriptor = self._file(shard)
        if descriptor is None:
            return []
        table = self._index(shard, descriptor)[locals_]  # (n, 2) offset, nbytes
        written = np.flatnonzero(table[:, 0] != EMPTY)
        order = written[np.argsort(table[written, 0], kind="stable")]
        jobs, start = [], 0
        while start < len(order):
            stop = start + 1
            first = int(table[order[start], 0])
            while (stop < len(order) and table[order[stop], 0] + table[order[stop], 1] - first <= MAX_SPAN
                   and table[order[stop], 0] <= table[order[stop - 1], 0] + table[order[stop - 1], 1] + MAX_GAP):
                stop += 1
            end = int(max(table[i, 0] + table[i, 1] for i in order[start:stop]))
            span = np.frombuffer(os.pread(descriptor, end - first, first), dtype=np.uint8)
            for i in order[start:stop]:
                offset, nbytes = int(table[i, 0]) - first, int(table[i, 1])
                jobs.append((int(positions[i]), shard * self.rows_per_shard + int(locals_[i]),
                             span[offset : offset + nbytes]))
            start = stop
        return jobs

    def _decode(self, jobs: list[tuple[int, int, np.ndarray]], out: np.ndarray) -> None:
        flat = out.reshape(len(out), self.row_bytes // self.dtype.itemsize).view(np.uint8)
        for position, row, chunk in jobs:
            if google_crc32c.value(chunk[:-4]) != int(chunk[-4:].view("<u4")[0]):
                raise ChecksumError(f"{self.shard_path(row // self.rows_per_shard)}: row {row} fails its crc32c "
                                    "checksum (damaged file); `mellow store verify` names every damaged clip")
            zstd.decompress(chunk[:-4], flat[position])

    def close(self) -> None:
        if self._pid == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)
            if self._pool is not None:
                self._pool.shutdown()
        self._pid = None


def open_rows(array_path: Path, threads: int = 2, shard_bytes: list[int | None] | None = None,
              required: np.ndarray | None = None) -> ShardedRows | None:
    """A ShardedRows for the array at `array_path`, or None when it is laid out otherwise (read it with zarr)."""
    try:
        return ShardedRows(array_path, threads, shard_bytes, required)
    except ShardLayoutError:
        return None


def read_with_zarr(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """The same rows through zarr (the reference, and the path for arrays of another layout)."""
    return array.get_orthogonal_selection(np.asarray(rows))

