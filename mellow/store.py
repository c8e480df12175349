"""The embedding store: a Zarr v3 group of per-clip encoder tokens, sharded, checksummed and self-describing.

    shards/<dataset>/<encoder-tag>/
        store.zarr/       emb (N, T, D) float16 ((N, V, T, D) with V > 1 views per clip), one chunk per clip,
                          sharding codec (S clips per shard file), zstd + crc32c; valid (N,) or (N, V) int16,
                          valid tokens per clip (and view), chunked like the shards
        parts/            shard-00000.json ... one per finished shard, written after its data: the commit marker,
                          with its clips' records and the byte size of its files
        index.jsonl       id -> row, duration, source path, audio sha256, status (written by finalize)
        meta.json         fingerprint (encoder, weights hash, preprocessing, pooling, dtype, code version), counts,
                          each shard file's size, whether it is complete, its revision
        changes.jsonl     one line per revision: the shards recomputed and the clips re-encoded since it was made
        report.json       what the precompute run did, with every skipped clip and its reason

A shard's rows are written in one piece by one process and only then marked done, so a crash leaves at worst
an unmarked shard, which the next run recomputes. Readers use only marked shards (through the index), and refuse
a shard file that is not as long as it was written (mellow/integrity.py). One process creates (or grows) the
arrays and one finalizes, each holding an O_EXCL lock file. docs/store.md is the full format reference.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
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
from mellow.integrity import DamagedStoreError, ShardFiles
from mellow.manifests import DATASETS_ROOT
from mellow.progress import console
from mellow.shard_reader import ShardedRows, ShardFileError, open_rows

FORMAT_VERSION = 2  # 2: views (an (N, V, T, D) layout when V > 1), pooling in the fingerprint
CREATION_LOCK = ".creating"
FINALIZE_LOCK = ".finalizing"
META_LOCK = ".meta.lock"  # flock'ed around every read-modify-write of meta.json after creation
STAT_KEYS = ("bytes", "mtime_ns")  # a clip's file identity in the shard markers; not in index.jsonl, whose sha256
# identifies the store's rows: a file that was only touched changes these, not the rows

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

        With `manifest` (one dict per row, in row order, with `id` and a caption's `text`), a store made from
        the first part of the same manifest grows: its rows and ids stay, new rows are added, and only new shards
        (plus the old last one if it was partial) are computed. Committed rows whose id or text differ from the
        manifest are refused, never silently kept (changed audio is 01_precompute's to find: it re-encodes)."""
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
        """Every committed shard must hold the manifest's rows: the same ids, the same caption texts."""
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
                if old.get("text") is not None and new.get("text") is not None and old["text"] != new["text"]:
                    raise StoreMismatchError(
                        f"{self.path}: {new['id']} (row {old['row']}, shard {shard}) changed since it was "
                        "computed: its caption text differs. A store keeps the rows it computed; remove the store "
                        "folder to rebuild it, or add the changed caption under a new id at the end of the manifest")

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
                                                        "files": self.files.sizes(shard), "records": records})
        except OSError:
            self._remove_shard_files(shard)  # uncommitted: free its space; the next run writes it again
            raise

    @cached_property
    def files(self) -> ShardFiles:
        return ShardFiles(self.path)

    def _remove_shard_files(self, shard: int) -> None:
        """Delete what an interrupted run left of this shard: zarr merges a write into an existing shard file,
        and a truncated one fails its checksum, so an uncommitted shard is always rewritten from nothing."""
        for array in ("emb", "valid"):
            self.files.path(array, shard).unlink(missing_ok=True)

    def read_marker(self, shard: int) -> dict:
        return read_json(self._marker(shard))

    def damage(self, shard: int, marker: dict) -> str | None:
        """What is wrong with a committed shard's files (missing, cut short, not as written), from its marker; None
        when nothing is."""
        holds_encoded = any(record["status"] == "ok" for record in marker["records"])
        return self.files.problem(shard, marker.get("files"), holds_encoded)

    def take_back_damaged(self, damaged: dict[int, str]) -> None:
        """Uncommit (to compute again) shards whose files are damaged ({shard: what is wrong}), saying so."""
        for shard, problem in sorted(damaged.items()):
            message = self.files.describe(shard, problem, remedy="computing it again")
            console.print(f"[yellow]damaged:[/] {escape(message)}", highlight=False)
        self.uncommit(sorted(damaged), "shard files damaged")

    def committed_markers(self, shards: Iterable[int]) -> Iterator[tuple[int, dict]]:
        """(shard, marker) of each committed shard among `shards`, with its damaged ones taken back (said, and to be
        computed again): each marker is read once, for whatever else the caller checks in it."""
        damaged = {}
        for shard in shards:
            if self.is_done(shard):
                marker = self.read_marker(shard)
                problem = self.damage(shard, marker)
                if problem is None:
                    yield shard, marker
                else:
                    damaged[shard] = problem
        self.take_back_damaged(damaged)

    def uncommit(self, shards: list[int], why: str, clips: list[str] = ()) -> None:
        """Take committed shards back, so that this run computes them again: their markers and files go, the store
        is no longer complete, its revision goes up, and changes.jsonl records why (and which clips change)."""
        if not shards:
            return
        for shard in shards:
            self._marker(shard).unlink(missing_ok=True)
            self._remove_shard_files(shard)
        with meta_lock(self.path):
            meta = self.read_meta()
            revision = meta.get("revision", 0) + 1
            write_json_atomic(self.path / "meta.json", {**meta, "complete": False, "finalized": False,
                                                        "revision": revision})
            line = {"revision": revision, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": sorted(shards),
                    "clips": list(clips), "why": why}
            with open(self.path / "changes.jsonl", "a") as handle:
                handle.write(json.dumps(line) + "\n")

    def refresh_stats(self, shard: int, stats: dict[int, tuple[int, int]]) -> None:
        """Record new (bytes, mtime_ns) for rows of a committed shard whose files were touched but hold the audio
        that was encoded (so the next run need not hash them again)."""
        marker = self.read_marker(shard)
        for record in marker["records"]:
            if record["row"] in stats:
                record["bytes"], record["mtime_ns"] = stats[record["row"]]
        write_json_atomic(self._marker(shard), marker)

    def missing_shards(self) -> list[int]:
        return [shard for shard in range(self.num_shards) if not self.is_done(shard)]

    def all_done(self) -> bool:
        return not self.missing_shards()

    def read_meta(self) -> dict:
        return read_json(self.path / "meta.json")

    def finalize(self, extra_meta: dict, max_failures: float = 1.0) -> dict:
        """Write index.jsonl and meta.json from the shard markers; return the meta. The store is complete (training
        and eval open it) only if no more than `max_failures` of its rows failed."""
        with meta_lock(self.path):
            return self._finalize(extra_meta, max_failures)

    def _finalize(self, extra_meta: dict, max_failures: float) -> dict:
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: shards {missing[:10]} are not done")
        # streamed shard by shard: at a million clips, holding every record as a dict would cost gigabytes
        ids, rows, ok = [], [], 0
        shard_bytes: dict[str, list[int | None]] = {"emb": [], "valid": []}
        temporary = self.path / f".index.jsonl.tmp-{os.getpid()}"
        # the index holds about what the shard markers hold, and the id index ~40 bytes per row
        needed = sum(self._marker(shard).stat().st_size for shard in range(self.num_shards)) + 40 * self.num_rows
        try:
            with disk_space(self.path, "the store's index (index.jsonl, index-ids.npy)", needed):
                with open(temporary, "w") as handle:
                    for shard in range(self.num_shards):
                        marker = read_json(self._marker(shard))
                        records = marker["records"]
                        for array in shard_bytes:
                            shard_bytes[array].append((marker.get("files") or {}).get(array))
                        handle.writelines(json.dumps({key: value for key, value in record.items()
                                                      if key not in STAT_KEYS}) + "\n" for record in records)
                        ids.extend(record["id"] for record in records)
                        rows.extend(record["row"] if record["status"] == "ok" else -1 for record in records)
                        ok += sum(record["status"] == "ok" for record in records)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path / "index.jsonl")
                write_id_index(self.path, ids, np.array(rows, dtype=np.int64))
        finally:
            temporary.unlink(missing_ok=True)
        counts = {"rows": len(ids), "ok": ok, "failed": len(ids) - ok}
        meta = {**read_json(self.path / "meta.json"), **extra_meta, "finalized": True,
                "complete": not over_budget(counts, max_failures), "max_failures": max_failures,
                "index_sha256": sha256_file(self.path / "index.jsonl"), "counts": counts, "shard_bytes": shard_bytes}
        write_json_atomic(self.path / "meta.json", meta)
        return meta


def dataset_of(store_path: Path, option: str) -> Path:
    """The dataset folder a store was made from, which its meta.json names; if that folder is not here (the store
    was copied from another machine), the folder of the same name under the datasets root. A ValueError saying to
    pass `option` when neither holds the dataset."""
    if not (store_path / "meta.json").is_file():
        raise ValueError(f"{store_path} is not an embedding store (no meta.json); run 01_precompute and pass its "
                         "output folder (shards/<dataset>/<encoder-tag>)")
    recorded = read_json(store_path / "meta.json").get("dataset")
    if not recorded:
        raise ValueError(f"{store_path}'s meta.json does not name the dataset it was made from: pass {option}")
    for candidate in (Path(recorded), DATASETS_ROOT / Path(recorded).name):
        if (candidate / "audio.jsonl").is_file():
            return candidate
    raise ValueError(f"{store_path} was made from the dataset {recorded} (its meta.json), which is not found from "
                     f"{Path.cwd()}: pass {option} <where it is now>")


@contextmanager
def meta_lock(path: Path) -> Iterator[None]:
    """Hold the store's meta.json lock (flock: released by the kernel if the process dies) while meta.json is
    read, changed and written, so that a rank taking a damaged shard back and one finalizing do not interleave."""
    descriptor = os.open(path / META_LOCK, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def over_budget(counts: dict, max_failures: float) -> bool:
    return counts["failed"] / max(counts["rows"], 1) > max_failures


def accepting_budget(counts: dict) -> float:
    """The smallest --max-failures (in hundredths) that accepts a store with these counts."""
    return math.ceil(counts["failed"] / max(counts["rows"], 1) * 100 - 1e-9) / 100


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
            counts = self.meta.get("counts")
            if self.meta.get("finalized") and counts and over_budget(counts, self.meta.get("max_failures", 0.0)):
                raise ValueError(f"{self.path}: {counts['failed']} of {counts['rows']} clips failed, more than the "
                                 f"--max-failures {self.meta['max_failures']:g} it was made with, so it is not "
                                 f"accepted; to accept it run `uv run mellow store finalize {self.path} "
                                 f"--max-failures {accepting_budget(counts):g}`")
            raise ValueError(f"{self.path} is incomplete (precompute was interrupted, or is recomputing shards); "
                             "rerun 01_precompute")
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

    @cached_property
    def files(self) -> ShardFiles:
        return ShardFiles(self.path)

    @property
    def revision(self) -> int:
        """How many times shards of the store were taken back and computed again since it was made."""
        return self.meta.get("revision", 0)

    def changes_since(self, revision: int) -> str | None:
        """What changed in the store after `revision` (from changes.jsonl), as a phrase; None if nothing did."""
        if self.revision <= revision or not (self.path / "changes.jsonl").is_file():
            return None
        phrases = []
        for change in read_jsonl(self.path / "changes.jsonl"):
            if change["revision"] > revision:
                clips = change["clips"]
                phrases.append(f"re-encoded {', '.join(clips[:5])}{' …' if len(clips) > 5 else ''} ({change['why']})"
                               if clips else f"recomputed shard(s) {', '.join(map(str, change['shards']))} "
                                             f"({change['why']})")
        return "; ".join(phrases) or None

    @cached_property
    def encoded_rows(self) -> np.ndarray:
        """(N,) bool: the rows whose clip encoded (their data must be there; a failed clip's row is zeros)."""
        encoded = np.zeros(self.meta["rows"], dtype=bool)
        rows = np.asarray(self.rows.row_array)
        encoded[rows[rows >= 0]] = True
        return encoded

    def check_files(self) -> None:
        """Refuse (DamagedStoreError) a store one of whose shard files is missing, cut short or not as written:
        a stat per shard file (and, for a store made before sizes were recorded, its chunk index)."""
        recorded = self.meta.get("shard_bytes") or {}
        encoded = self.encoded_rows
        per_shard = self.meta["clips_per_shard"]
        for shard in range(-(-self.meta["rows"] // per_shard)):
            committed = {array: sizes[shard] for array, sizes in recorded.items() if shard < len(sizes)}
            problem = self.files.problem(shard, committed, bool(encoded[shard * per_shard : (shard + 1) * per_shard]
                                                                .any()))
            if problem is not None:
                raise DamagedStoreError(self.files.describe(shard, problem))

    def row_reader(self, threads: int = 2) -> ShardedRows | None:
        """A reader of `emb` rows that refuses a missing or short shard file and an encoded row without data (None
        for an array laid out otherwise: read it with zarr)."""
        return open_rows(self.path / "store.zarr" / "emb", threads, (self.meta.get("shard_bytes") or {}).get("emb"),
                         self.encoded_rows)

    def damaged(self, error: ShardFileError) -> DamagedStoreError:
        """The store's one-line message for a shard file a reader found damaged."""
        return DamagedStoreError(self.files.describe(error.shard, f"{self.files.named('emb', error.shard)} "
                                                                  f"{error.problem}"))

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All embeddings (N, V, T, D) float16 and valid token counts (N, V), read shard by shard (sequential
        I/O, straight from the shard files where the layout allows: 20x zarr's speed for small rows). A one-view
        store (stored as (N, T, D)) gets V = 1; a view with 0 valid tokens does not exist (the clip was too
        short for it)."""
        reader = self.row_reader()
        if reader is None:
            return with_view_axis(self.emb[:], 4), self.load_all_valid()
        embeddings = np.empty(self.emb.shape, dtype=self.emb.dtype)
        try:
            for start in range(0, reader.num_rows, reader.rows_per_shard):
                embeddings[start : start + reader.rows_per_shard] = reader.read(
                    np.arange(start, min(start + reader.rows_per_shard, reader.num_rows)))
        except ShardFileError as error:
            raise self.damaged(error) from None
        finally:
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


def finalize_store(writer: StoreWriter, dataset: Path | str, seconds: float, max_failures: float) -> dict:
    """Write the index, meta.json and report.json (with every failed clip); return the counts. The store is
    complete only if no more than `max_failures` of its rows failed (check_failures says what to do if not)."""
    meta = writer.finalize({"dataset": str(dataset), "code_version": code_version(), "decoder": decoder_description()},
                           max_failures)
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
    """Raise TooManyFailuresError, saying what was kept and how to accept it, if more than `max_failures` failed."""
    if over_budget(counts, max_failures):
        raise TooManyFailuresError(
            f"{counts['ok']} of {counts['rows']} {rows_are} encoded ({counts['failed']} failed: see "
            f"{store_path / 'report.json'}); the store is usable; to accept it run `uv run mellow store finalize "
            f"{store_path} --max-failures {accepting_budget(counts):g}` (more than --max-failures {max_failures:g} "
            "failed, so it is not marked complete until then)")
