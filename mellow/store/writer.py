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
a shard file that is not as long as it was written (mellow/store/integrity.py). One process creates (or grows) the
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
from mellow.audio.decode import decoder_description
from mellow.config import describe_differences, setting
from mellow.errors import TooManyFailuresError
from mellow.files import disk_space, read_json, sha256_file, write_json_atomic
from mellow.progress import console
from mellow.store.index import write_id_index
from mellow.store.integrity import ShardFiles

FORMAT_VERSION = 2  # 2: views (an (N, V, T, D) layout when V > 1), pooling in the fingerprint


CREATION_LOCK = ".creating"


FINALIZE_LOCK = ".finalizing"


META_LOCK = ".meta.lock"  # flock'ed around every read-modify-write of meta.json after creation


STAT_KEYS = ("bytes", "mtime_ns")  # a clip's file identity in the shard markers; not in index.jsonl, whose sha256


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

