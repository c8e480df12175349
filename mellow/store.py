"""The embedding store: a Zarr v3 group of per-clip encoder tokens, sharded, checksummed and self-describing.

    shards/<dataset>/<encoder-tag>/
        store.zarr/       emb (N, T, D) float16 ((N, V, T, D) with V > 1 views per clip), one chunk per clip,
                          sharding codec (S clips per shard file), zstd + crc32c; valid (N,) or (N, V) int16,
                          valid tokens per clip (and view), chunked like the shards
        parts/            shard-00000.json ... one per finished shard, written after its data: the commit marker
        index.jsonl       id -> row, duration, source path, audio sha256, status (written by finalize)
        meta.json         fingerprint (encoder, weights hash, preprocessing, pooling, dtype, code version), counts
        report.json       what the precompute run did, with every skipped clip and its reason

A shard's rows are written in one piece by one process and only then marked done, so a crash leaves at worst
an unmarked shard, which the next run recomputes. Readers use only marked shards (through the index). One
process creates (or grows) the arrays and one finalizes, each holding an O_EXCL lock file. docs/store.md is
the full format reference.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import zip_longest
from pathlib import Path

import numpy as np
import zarr
from rich.markup import escape
from zarr.codecs import Crc32cCodec, ZstdCodec

import mellow
from mellow.audio import decoder_description
from mellow.config import describe_differences, setting
from mellow.errors import TooManyFailuresError
from mellow.files import disk_space, read_json, read_jsonl, sha256_file, write_json_atomic
from mellow.progress import console
from mellow.shard_reader import open_rows, read_with_zarr

FORMAT_VERSION = 2  # 2: views (an (N, V, T, D) layout when V > 1), pooling in the fingerprint
CREATION_LOCK = ".creating"
FINALIZE_LOCK = ".finalizing"

# One chunk per clip means thousands of tiny chunks per shard; zarr's default codec pipeline takes them one at
# a time, and that per-chunk overhead dominated writing and reading (0.33 -> 0.17 ms per clip written, measured
# with 16 x 80 float16 clips). Batching does not change the bytes on disk.
zarr.config.set({"codec_pipeline.batch_size": 16})


class StoreMismatchError(ValueError):
    """A store's fingerprint differs from what the caller expects."""


@dataclass
class StoreConfig:
    root: Path = setting(Path(os.environ.get("MELLOW_SHARDS") or "shards"), "Folder that holds all stores: "
                                                                            "<root>/<dataset>/<encoder-tag>/ "
                                                                            "($MELLOW_SHARDS).")
    shard_megabytes: int = setting(128, "Target size of one shard file before compression, in MB.")
    shard_clips: int = setting(0, "Clips per shard; overrides shard_megabytes when > 0.")
    zstd_level: int = setting(3, "zstd compression level of the embeddings (1 fast .. 19 small).")

    def __post_init__(self) -> None:
        if self.shard_megabytes < 1 or self.shard_clips < 0:
            raise ValueError("--shard-megabytes must be >= 1 and --shard-clips >= 0")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"--zstd-level {self.zstd_level} must be between 1 and 22")

    def clips_per_shard(self, row_bytes: int) -> int:
        if self.shard_clips:
            return self.shard_clips
        return max(1, self.shard_megabytes * 2**20 // row_bytes)


@dataclass
class EncoderExpectation:
    """What a training config expects of its store (the `encoder:` section); unset fields accept anything."""

    name: str | None = setting(None, "Encoder the store must be made with (whisper-tiny, mel, hf:<dir>); "
                                     "unset: any.")
    weights_hash: str | None = setting(None, "Weights hash of that encoder (the store's meta.json); unset: any.")
    clip_seconds: float | None = setting(None, "Clip length the store must use; unset: any.")
    crop: str | None = setting(None, "Crop policy the store must use (pad, center, repeat); unset: any.")
    views: int | None = setting(None, "Views per clip the store must hold; unset: any.")
    tokens: int | None = setting(None, "Tokens per clip the store must hold; unset: any.")

    def check(self, store_path: Path, fingerprint: dict) -> None:
        """Raise StoreMismatchError listing every set field whose value the store's fingerprint does not have."""
        stored = {"views": 1, **fingerprint}  # stores made before views existed have one
        differences = []
        for key, value in vars(self).items():
            stored_value = stored.get("encoder" if key == "name" else key)
            if value is not None and value != stored_value:
                differences.append(f"{key}: the config expects {value!r}, the store has {stored_value!r}")
        if differences:
            raise StoreMismatchError(f"--train.store {store_path} was made differently from what the config's "
                                     "encoder section expects:\n  " + "\n  ".join(differences)
                                     + "\nprecompute a store with those settings, or change the encoder section")


def code_version() -> str:
    return f"mellow-{mellow.__version__}/store-v{FORMAT_VERSION}"


def row_shape(fingerprint: dict) -> tuple[int, ...]:
    """Shape of one clip's row of `emb`: (T, D), or (V, T, D) for a store of V > 1 views per clip."""
    views = fingerprint.get("views", 1)
    return (fingerprint["tokens"], fingerprint["dim"]) if views == 1 else (views, fingerprint["tokens"],
                                                                          fingerprint["dim"])


class StoreWriter:
    """Creates (or reopens) a store and writes it one whole shard at a time."""

    def __init__(self, path: Path, num_rows: int, fingerprint: dict, config: StoreConfig,
                 wait_seconds: float = 600.0, manifest: list[dict] | None = None) -> None:
        """Open the store at `path`, creating it if no process has yet. Several processes may call this at
        once (torchrun ranks, SLURM array tasks): one creates the arrays, the others wait for its meta.json.

        With `manifest` (one dict per row, in row order, with `id` and the audio's `sha256` or a caption's
        `text`), a store made from the first part of the same manifest grows: its rows and ids stay, new rows
        are added, and only new shards (plus the old last one if it was partial) are computed. Committed rows
        whose id, audio or text differ from the manifest are refused, never silently kept."""
        self.path = path
        self.fingerprint = fingerprint
        self.num_rows = num_rows
        meta_path = path / "meta.json"
        if not meta_path.exists():
            with self.exclusive(CREATION_LOCK) as claimed:
                if claimed and not meta_path.exists():  # another process may have finished creating it meanwhile
                    self._create(config)
        self._wait_until(meta_path.exists, wait_seconds)
        group = zarr.open_group(path / "store.zarr", mode="r+")
        self.emb, self.valid = group["emb"], group["valid"]
        meta = read_json(meta_path)
        self.clips_per_shard = meta["clips_per_shard"]
        same_encoding = not describe_differences(meta["fingerprint"], fingerprint)
        if manifest is not None and same_encoding:
            self._check_manifest(meta["rows"], manifest)
            if meta["rows"] < num_rows:
                meta = self._grow(meta, wait_seconds)
        self._check_existing(meta)

    @classmethod
    def open_existing(cls, path: Path) -> StoreWriter:
        """Reopen a store created earlier (for `mellow store finalize`)."""
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"{path} is not an embedding store (no meta.json)")
        meta = read_json(path / "meta.json")
        return cls(path, meta["rows"], meta["fingerprint"], StoreConfig(), wait_seconds=0)

    @contextmanager
    def exclusive(self, lock_name: str) -> Iterator[bool]:
        """Yield True to the one process that gets the lock file `lock_name` (O_EXCL), False to the others;
        release it. Used so that exactly one process creates, grows or finalizes the store."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.path / lock_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            yield False
            return
        try:
            yield True
        finally:
            (self.path / lock_name).unlink(missing_ok=True)

    def _wait_until(self, condition: Callable[[], bool], wait_seconds: float) -> None:
        """Wait for the process holding the creation lock to finish what `condition` checks."""
        deadline = time.time() + wait_seconds
        while not condition():
            if time.time() > deadline:
                raise TimeoutError(f"{self.path}: another process is creating or growing this store "
                                   f"({CREATION_LOCK} is there) and has not finished; if none is running, delete "
                                   f"{self.path / CREATION_LOCK} and rerun")
            time.sleep(0.2)

    def _create(self, config: StoreConfig) -> None:
        row = row_shape(self.fingerprint)
        clips_per_shard = config.clips_per_shard(int(np.prod(row)) * 2)
        views = row[:-2]  # () or (V,)
        group = zarr.open_group(self.path / "store.zarr", mode="w", zarr_format=3)
        group.create_array(
            "emb", shape=(self.num_rows, *row), chunks=(1, *row), shards=(clips_per_shard, *row),
            dtype="float16", fill_value=0, compressors=[ZstdCodec(level=config.zstd_level), Crc32cCodec()],
        )
        group.create_array(
            "valid", shape=(self.num_rows, *views), chunks=(clips_per_shard, *views), dtype="int16", fill_value=0,
            compressors=[ZstdCodec(level=config.zstd_level), Crc32cCodec()],
        )
        write_json_atomic(self.path / "meta.json", {
            "fingerprint": self.fingerprint, "rows": self.num_rows, "complete": False,
            "clips_per_shard": clips_per_shard, "code_version": code_version()})

    def _check_manifest(self, stored_rows: int, manifest: list[dict]) -> None:
        """Every committed shard must hold the manifest's rows: the same ids, the same audio or caption."""
        for shard in range(-(-stored_rows // self.clips_per_shard)):
            if not self.is_done(shard):
                continue
            stored = read_json(self._marker(shard))["records"]
            start = shard * self.clips_per_shard
            for old, new in zip_longest(stored, manifest[start : start + len(stored)], fillvalue={}):
                if old.get("id") != new.get("id"):
                    raise StoreMismatchError(
                        f"{self.path}: shard {shard} holds other clips than the manifest has at its rows; a store "
                        "keeps its rows, and grows only by clips appended at the end of audio.jsonl. Remove the "
                        "store folder to rebuild it for a reordered or edited manifest")
                for key, what in (("sha256", "its audio file (sha256)"), ("text", "its caption text")):
                    if old.get(key) is not None and new.get(key) is not None and old[key] != new[key]:
                        raise StoreMismatchError(
                            f"{self.path}: {new['id']} (row {old['row']}, shard {shard}) changed since it was "
                            f"computed: {what} differs. A store keeps the rows it computed; remove the store folder "
                            "to rebuild it, or add the changed clip under a new id at the end of the manifest")

    def _grow(self, meta: dict, wait_seconds: float) -> dict:
        """Add rows for clips appended to the manifest (one process does it; the others wait for it)."""
        old_rows = meta["rows"]
        with self.exclusive(CREATION_LOCK) as claimed:
            if claimed:
                if old_rows % self.clips_per_shard and self.is_done(old_rows // self.clips_per_shard):
                    self._marker(old_rows // self.clips_per_shard).unlink()  # partial last shard: recompute
                self.emb.resize((self.num_rows, *self.emb.shape[1:]))
                self.valid.resize((self.num_rows,))
                write_json_atomic(self.path / "meta.json", {**meta, "rows": self.num_rows, "complete": False})
        self._wait_until(lambda: read_json(self.path / "meta.json")["rows"] == self.num_rows, wait_seconds)
        group = zarr.open_group(self.path / "store.zarr", mode="r+")  # reopen: the shape changed
        self.emb, self.valid = group["emb"], group["valid"]
        return read_json(self.path / "meta.json")

    def _check_existing(self, meta: dict) -> None:
        differences = describe_differences(meta["fingerprint"], self.fingerprint)
        if meta["rows"] != self.num_rows:
            differences.append(f"rows: store has {meta['rows']}, manifest has {self.num_rows}")
        if differences:
            raise StoreMismatchError(f"{self.path} holds a different store:\n  " + "\n  ".join(differences)
                                     + "\nremove that folder (or use another --store-root) to rebuild it")

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.clips_per_shard)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.clips_per_shard, min((shard + 1) * self.clips_per_shard, self.num_rows))

    def _marker(self, shard: int) -> Path:
        return self.path / "parts" / f"shard-{shard:05d}.json"

    def is_done(self, shard: int) -> bool:
        return self._marker(shard).exists()

    @contextmanager
    def claim(self, shard: int) -> Iterator[bool]:
        """Yield True while this process alone may compute `shard`: it holds the shard's flock (the kernel drops
        it if the process dies) and the shard is not done. False when another process holds it or finished it,
        e.g. a second precompute started on the same store by mistake: it then takes the other shards, and the
        store is the one a single process makes."""
        (self.path / ".locks").mkdir(exist_ok=True)
        descriptor = os.open(self.path / ".locks" / f"shard-{shard:05d}", os.O_CREAT | os.O_RDWR)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield not self.is_done(shard)
        finally:
            os.close(descriptor)

    def write_shard(self, shard: int, embeddings: np.ndarray, valid: np.ndarray, records: list[dict]) -> None:
        """Write a whole shard's rows, then its marker (the commit). `embeddings` is (rows, V, T, D) and
        `valid` (rows, V), also for a one-view store; `records` describe each row."""
        rows = self.shard_rows(shard)
        assert embeddings.shape[0] == len(rows) == len(records), "a shard is written whole"
        if self.emb.ndim == 3:  # a one-view store keeps the plain (N, T, D) layout
            embeddings, valid = embeddings[:, 0], valid[:, 0]
        self._remove_shard_files(shard)
        needed = embeddings.nbytes + valid.nbytes  # before compression: an upper bound
        try:
            with disk_space(self.path, f"shard {shard} ({len(rows)} clips)", needed):
                self.emb[rows.start : rows.stop] = embeddings
                self.valid[rows.start : rows.stop] = valid
                write_json_atomic(self._marker(shard), {"shard": shard, "rows": [rows.start, rows.stop],
                                                        "records": records})
        except OSError:
            self._remove_shard_files(shard)  # uncommitted: free its space; the next run writes it again
            raise

    def _remove_shard_files(self, shard: int) -> None:
        """Delete what an interrupted run left of this shard: zarr merges a write into an existing shard file,
        and a truncated one fails its checksum, so an uncommitted shard is always rewritten from nothing."""
        for array in (self.emb, self.valid):
            shard_file(self.path, array, shard).unlink(missing_ok=True)

    def missing_shards(self) -> list[int]:
        return [shard for shard in range(self.num_shards) if not self.is_done(shard)]

    def all_done(self) -> bool:
        return not self.missing_shards()

    def read_meta(self) -> dict:
        return read_json(self.path / "meta.json")

    def finalize(self, extra_meta: dict) -> dict:
        """Write index.jsonl and the completed meta.json from the shard markers; return the meta."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: shards {missing[:10]} are not done")
        # streamed shard by shard: at a million clips, holding every record as a dict would cost gigabytes
        ids, rows, ok = [], [], 0
        temporary = self.path / f".index.jsonl.tmp-{os.getpid()}"
        # the index holds about what the shard markers hold, and the id index ~40 bytes per row
        needed = sum(self._marker(shard).stat().st_size for shard in range(self.num_shards)) + 40 * self.num_rows
        try:
            with disk_space(self.path, "the store's index (index.jsonl, index-ids.npy)", needed):
                with open(temporary, "w") as handle:
                    for shard in range(self.num_shards):
                        records = read_json(self._marker(shard))["records"]
                        handle.writelines(json.dumps(record) + "\n" for record in records)
                        ids.extend(record["id"] for record in records)
                        rows.extend(record["row"] if record["status"] == "ok" else -1 for record in records)
                        ok += sum(record["status"] == "ok" for record in records)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path / "index.jsonl")
                write_id_index(self.path, ids, np.array(rows, dtype=np.int64))
        finally:
            temporary.unlink(missing_ok=True)
        meta = {**read_json(self.path / "meta.json"), **extra_meta, "complete": True,
                "index_sha256": sha256_file(self.path / "index.jsonl"),
                "counts": {"rows": len(ids), "ok": ok, "failed": len(ids) - ok}}
        write_json_atomic(self.path / "meta.json", meta)
        return meta


def with_view_axis(array: np.ndarray, ndim: int) -> np.ndarray:
    """A one-view store's rows ((N, T, D) embeddings, (N,) valid counts) with the view axis V = 1 added."""
    return array if array.ndim == ndim else array[:, None]


class EmbeddingStore:
    """Read side of a finished store (training, eval). Only complete stores open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not an embedding store (no meta.json); run 01_precompute")
        self.meta = read_json(meta_path)
        if not self.meta.get("complete"):
            raise ValueError(f"{self.path} is incomplete (precompute was interrupted); rerun 01_precompute")
        self.fingerprint: dict = self.meta["fingerprint"]
        group = zarr.open_group(self.path / "store.zarr", mode="r")
        self.emb, self.valid = group["emb"], group["valid"]

    @cached_property
    def rows(self) -> IdIndex:
        """id -> row of every clip that encoded (`id in store.rows`, `store.rows[id]`, `store.rows.lookup(ids)`)."""
        return IdIndex.open(self.path)

    @property
    def index(self) -> list[dict]:
        """Every record of index.jsonl (id, row, duration, source, sha256, status): one dict per row, so only for
        tools that need them all; lookups go through `rows`."""
        return read_jsonl(self.path / "index.jsonl")

    def index_sha256(self) -> str:
        """Identifies the store's rows (its index.jsonl); written into meta.json by finalize."""
        return self.meta.get("index_sha256") or sha256_file(self.path / "index.jsonl")

    @property
    def tokens(self) -> int:
        return self.fingerprint["tokens"]

    @property
    def dim(self) -> int:
        return self.fingerprint["dim"]

    @property
    def views(self) -> int:
        return self.fingerprint.get("views", 1)

    def rows_bytes(self) -> int:
        """Bytes of all rows in memory (uncompressed float16)."""
        return self.meta["rows"] * int(np.prod(row_shape(self.fingerprint))) * 2

    def load_all_valid(self) -> np.ndarray:
        """Valid token counts (N, V) int16 (V = 1 for a one-view store)."""
        return with_view_axis(self.valid[:], 2)

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All embeddings (N, V, T, D) float16 and valid token counts (N, V), read shard by shard (sequential
        I/O, straight from the shard files where the layout allows: 20x zarr's speed for small rows). A one-view
        store (stored as (N, T, D)) gets V = 1; a view with 0 valid tokens does not exist (the clip was too
        short for it)."""
        reader = open_rows(self.path / "store.zarr" / "emb")
        if reader is None:
            return with_view_axis(self.emb[:], 4), self.load_all_valid()
        embeddings = np.empty(self.emb.shape, dtype=self.emb.dtype)
        for start in range(0, reader.num_rows, reader.rows_per_shard):
            embeddings[start : start + reader.rows_per_shard] = reader.read(
                np.arange(start, min(start + reader.rows_per_shard, reader.num_rows)))
        reader.close()
        return with_view_axis(embeddings, 4), self.load_all_valid()

    def check_fingerprint(self, expected: dict, what: str) -> None:
        differences = describe_differences(expected, self.fingerprint)
        if differences:
            raise StoreMismatchError(f"{what} expects a store made differently from {self.path}:\n  "
                                     + "\n  ".join(differences))


INDEX_IDS, INDEX_ROWS = "index-ids.npy", "index-rows.npy"


def write_id_index(store_path: Path, ids: list[str], rows: np.ndarray) -> None:
    """The id -> row lookup as two arrays sorted by id (fixed-width UTF-8 bytes, int64 rows, -1 for a clip that
    failed), memory-mapped by readers: a dict of 1.2 M ids would cost every process ~150 MB and seconds."""
    encoded = np.array([clip_id.encode() for clip_id in ids], dtype=bytes) if ids else np.zeros(0, dtype="S1")
    order = np.argsort(encoded, kind="stable")
    for name, array in ((INDEX_IDS, encoded[order]), (INDEX_ROWS, np.asarray(rows, dtype=np.int64)[order])):
        temporary = store_path / f".{name}.partial"
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, array)
            os.replace(temporary, store_path / name)
        finally:
            temporary.unlink(missing_ok=True)


class IdIndex:
    """Clip id -> store row, from the two sorted arrays of write_id_index (binary search, memory-mapped)."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self.ids, self.row_array = ids, rows

    @classmethod
    def open(cls, store_path: Path) -> IdIndex:
        if (store_path / INDEX_IDS).exists() and (store_path / INDEX_ROWS).exists():
            return cls(np.load(store_path / INDEX_IDS, mmap_mode="r"), np.load(store_path / INDEX_ROWS, mmap_mode="r"))
        # a store finalized before the arrays existed: build them in memory from index.jsonl
        records = read_jsonl(store_path / "index.jsonl")
        ids = np.array([record["id"].encode() for record in records], dtype=bytes)
        order = np.argsort(ids, kind="stable")
        rows = np.array([record["row"] if record["status"] == "ok" else -1 for record in records], dtype=np.int64)
        return cls(ids[order], rows[order])

    def lookup(self, ids: list[str] | np.ndarray, absent: int = -1) -> np.ndarray:
        """Rows of `ids` (int64): -1 for a clip that failed to encode, `absent` for an id the store never had."""
        wanted = np.asarray([clip_id.encode() for clip_id in ids] if isinstance(ids, list) else ids, dtype=bytes)
        if not len(self.ids) or not len(wanted):
            return np.full(len(wanted), absent, dtype=np.int64)
        position = np.searchsorted(self.ids, wanted).clip(max=len(self.ids) - 1)
        found = self.ids[position] == wanted
        return np.where(found, self.row_array[position], absent).astype(np.int64)

    def __contains__(self, clip_id: str) -> bool:
        return bool(self.lookup([clip_id])[0] >= 0)

    def __getitem__(self, clip_id: str) -> int:
        row = int(self.lookup([clip_id])[0])
        if row < 0:
            raise KeyError(clip_id)
        return row

    def __len__(self) -> int:
        """Clips that encoded."""
        return int((self.row_array >= 0).sum())

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, row) of every clip that encoded, in id order (for tools that walk them all)."""
        encoded = np.flatnonzero(np.asarray(self.row_array) >= 0)
        return ((self.ids[i].decode(), int(self.row_array[i])) for i in encoded)

    def __iter__(self) -> Iterator[str]:
        return (clip_id for clip_id, _ in self.items())


def shard_file(store_path: Path, array: zarr.Array, shard: int) -> Path:
    """The file that holds shard `shard` of `array` (emb or valid)."""
    coordinates = (shard,) + (0,) * (array.ndim - 1)
    return store_path / "store.zarr" / array.path / array.metadata.encode_chunk_key(coordinates)


def committed_shards(path: Path) -> tuple[list[int], int]:
    """(the shards whose marker is written, how many shards the store has) of a store, finished or not."""
    meta = read_json(path / "meta.json")
    total = -(-meta["rows"] // meta["clips_per_shard"])
    return [shard for shard in range(total) if (path / "parts" / f"shard-{shard:05d}.json").exists()], total


def verify_store(path: Path) -> list[str]:
    """Check every chunk checksum and the index's rows; return one line per problem (empty: all good).

    A store that precompute has not finished (interrupted, or stopped by a full disk) is checked shard by shard
    for what it committed: every shard with a marker must read back; the others are rewritten by the next run.
    Each shard is read whole (straight from its file where the layout allows, else through zarr); a shard that
    fails is read clip by clip, so a damaged chunk is named by clip id. The index is streamed, not held as dicts.
    """
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not an embedding store (no meta.json)")
    meta = read_json(path / "meta.json")
    group = zarr.open_group(path / "store.zarr", mode="r")
    emb, valid = group["emb"], group["valid"]
    problems = []
    shards, total = committed_shards(path)
    if meta.get("complete"):
        shards = range(total)
        with open(path / "index.jsonl") as handle:
            rows = np.fromiter((json.loads(line)["row"] for line in handle if line.strip()), dtype=np.int64)
        if not np.array_equal(np.sort(rows), np.arange(meta["rows"])):
            problems.append(f"index.jsonl lists rows {len(rows)} for a store of {meta['rows']} rows")
    reader = open_rows(path / "store.zarr" / "emb")
    read = reader.read if reader else functools.partial(read_with_zarr, emb)
    per_shard = meta["clips_per_shard"]
    damaged: dict[int, tuple[int, Exception]] = {}  # row -> (shard, error)
    for shard in shards:
        start, stop = shard * per_shard, min((shard + 1) * per_shard, meta["rows"])
        try:
            read(np.arange(start, stop))
            valid[start:stop]
            continue
        except Exception:  # any codec or checksum error: find the clips it hits
            pass
        for row in range(start, stop):
            try:
                read(np.array([row]))
                valid[row]
            except Exception as error:
                damaged[row] = (shard, error)
    if damaged:
        ids = {}
        for record in _records(path, meta, sorted({shard for shard, _ in damaged.values()})):
            if record.get("row") in damaged:
                ids[record["row"]] = record["id"]
        for row, (shard, error) in damaged.items():
            problems.append(f"clip {ids.get(row, '?')} (row {row}) in shard {shard} "
                            f"({shard_file(path, emb, shard)}): {type(error).__name__}: {error}")
    return problems


def _records(path: Path, meta: dict, shards: list[int]) -> Iterator[dict]:
    """The index records of a store (streamed from index.jsonl when finished, else from the shards' markers)."""
    if meta.get("complete"):
        with open(path / "index.jsonl") as handle:
            yield from (json.loads(line) for line in handle if line.strip())
    else:
        for shard in shards:
            yield from read_json(path / "parts" / f"shard-{shard:05d}.json")["records"]


def finalize_store(writer: StoreWriter, dataset: Path | str, seconds: float) -> dict:
    """Write the index, meta.json and report.json (with every failed clip); return the counts."""
    meta = writer.finalize({"dataset": str(dataset), "code_version": code_version(), "decoder": decoder_description()})
    counts = meta["counts"]
    with open(writer.path / "index.jsonl") as handle:  # streamed: the failures are few, the records may be millions
        failures = [{**{key: r[key] for key in ("id", "path", "text") if key in r}, "reason": r["status"]}
                    for r in map(json.loads, handle) if r["status"] != "ok"]
    write_json_atomic(writer.path / "report.json", {"store": str(writer.path), "counts": counts,
                                                    "seconds_last_run": round(seconds, 2), "failures": failures})
    for failure in failures[:10]:
        console.print(f"  [yellow]skipped[/] {escape(failure['id'])}: {escape(failure['reason'])}")
    return counts


def check_failures(store_path: Path, counts: dict, max_failures: float, rows_are: str = "clips") -> None:
    fraction = counts["failed"] / max(counts["rows"], 1)
    if fraction > max_failures:
        raise TooManyFailuresError(f"{counts['failed']} of {counts['rows']} {rows_are} failed ({fraction:.1%}), more "
                                   f"than --max-failures {max_failures:.1%}; see {store_path / 'report.json'}")
