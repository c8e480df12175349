"""The store's clip id -> row lookup: two sorted arrays written at finalize, memory-mapped and binary-searched
by every reader (a dict of 1.2 M ids would cost each DataLoader worker ~150 MB)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mellow.files import read_jsonl

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

