"""Rows read straight from the shard files equal zarr's, for any selection, and damage is caught."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from mellow.store.shards import ChecksumError, ShardedRows, open_rows, read_with_zarr
from mellow.store.writer import StoreConfig, StoreWriter


def _write_store(path, rows: int, views: int, skip_shards: tuple[int, ...] = ()) -> zarr.Array:
    fingerprint = {"encoder": "test", "tokens": 5, "dim": 12, "views": views, "dtype": "float16"}
    writer = StoreWriter(path, rows, fingerprint, StoreConfig(shard_clips=7))
    generator = np.random.default_rng(0)
    for shard in writer.missing_shards():
        if shard in skip_shards:
            continue
        shard_rows = writer.shard_rows(shard)
        embeddings = generator.standard_normal((len(shard_rows), views, 5, 12)).astype(np.float16)
        writer.write_shard(shard, embeddings, np.full((len(shard_rows), views), 5, np.int16),
                           [{"id": f"clip{row}", "row": row, "status": "ok"} for row in shard_rows])
    return zarr.open_group(path / "store.zarr", mode="r")["emb"]


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_kind_of_selection_equals_zarr(tmp_path, views, threads):
    array = _write_store(tmp_path / "store", rows=40, views=views, skip_shards=(2,))  # 40 = 5 x 7 + 5: partial
    reader = ShardedRows(tmp_path / "store" / "store.zarr" / "emb", threads=threads)
    generator = np.random.default_rng(1)
    selections = [np.arange(40), np.arange(3, 30), generator.permutation(40)[:16], np.array([39, 0, 39, 14, 15]),
                  np.array([16]), np.array([], dtype=np.int64), np.arange(35, 40)]
    for rows in selections:
        got = reader.read(rows)
        assert got.shape == (len(rows), *array.shape[1:]) and got.dtype == np.float16
        np.testing.assert_array_equal(got, read_with_zarr(array, rows))
    assert not reader.read(np.arange(14, 21)).any()  # shard 2 was never written: the fill value, as zarr gives
    with pytest.raises(IndexError, match="outside 0..39"):
        reader.read(np.array([40]))


def test_a_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path):
    _write_store(tmp_path / "store", rows=14, views=1)
    shard_file = tmp_path / "store" / "store.zarr" / "emb" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[10] ^= 0xFF  # inside the first chunk of shard 1 (row 7)
    shard_file.write_bytes(bytes(data))
    reader = ShardedRows(tmp_path / "store" / "store.zarr" / "emb")
    np.testing.assert_array_equal(reader.read(np.arange(7)), read_with_zarr(
        zarr.open_group(tmp_path / "store" / "store.zarr", mode="r")["emb"], np.arange(7)))  # shard 0 is fine
    with pytest.raises(ChecksumError, match=r"c/1/0/0: row 7 fails its crc32c checksum"):
        reader.read(np.array([8, 7]))
    data[-2] ^= 0xFF  # the shard index's own checksum
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard index fails its crc32c checksum"):
        ShardedRows(tmp_path / "store" / "store.zarr" / "emb").read(np.array([9]))


def test_an_array_of_another_layout_is_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    group.create_array("emb", shape=(10, 5, 12), chunks=(2, 5, 12), dtype="float16")  # unsharded, default codecs
    assert open_rows(tmp_path / "other.zarr" / "emb") is None
