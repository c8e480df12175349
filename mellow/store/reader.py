"""Reading a store: `EmbeddingStore` checks the fingerprint against what a stage expects, reads committed
rows through the shard reader, and refuses damaged shard files; `dataset_of` names the dataset a store was
made from."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from mellow.config import describe_differences
from mellow.files import read_json, read_jsonl, sha256_file
from mellow.manifests import DATASETS_ROOT
from mellow.store.index import IdIndex
from mellow.store.integrity import DamagedStoreError, ShardFiles
from mellow.store.shards import ShardedRows, ShardFileError, open_rows
from mellow.store.writer import StoreMismatchError, accepting_budget, over_budget, row_shape


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


def recorded_fingerprint(path: Path, option: str = "--like") -> dict:
    """The audio encoder fingerprint that `path` records: a store (meta.json), a checkpoint (trainer.json), a
    training run (its latest checkpoint, else its newest step-*) or a model folder written by `mellow export`
    (encoder.json). A ValueError naming `option` for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{option} {path}: no such folder; pass a store, a run or checkpoint folder, or an exported "
                         "model")
    candidates = [path / "meta.json", path / "trainer.json", path / "encoder.json"]
    if (path / "latest.json").is_file():
        candidates.append(path / read_json(path / "latest.json")["path"] / "trainer.json")
    candidates += sorted(path.glob("step-*/trainer.json"), reverse=True)
    for candidate in candidates:
        if candidate.is_file():
            found = read_json(candidate)
            fingerprint = found.get("store_fingerprint") if candidate.name == "trainer.json" else \
                found.get("fingerprint") if candidate.name == "meta.json" else found
            if isinstance(fingerprint, dict) and fingerprint.get("kind") != "text" and "encoder" in fingerprint:
                return fingerprint
            raise ValueError(f"{option} {path}: {candidate} records no audio encoder fingerprint; pass an audio store, "
                             "a run or checkpoint folder made by 03_train, or a model folder made by `mellow export`")
    raise ValueError(f"{option} {path}: not a store (meta.json), a run or checkpoint folder (trainer.json) nor an "
                     "exported model (encoder.json)")


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

