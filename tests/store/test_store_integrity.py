"""A store that verifies really is whole. A shard file that is deleted, cut short or emptied (a half-finished
copy, a careless `rm`) is named with its shard and clip ids by `mellow store verify`, refused with the same message
by the training and eval readers (stock zarr would read its rows as zeros), and recomputed by 01_precompute."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mellow.cli import app
from mellow.encode import precompute
from mellow.files import read_json, read_jsonl, write_json_atomic
from mellow.settings import EncoderConfig, PrecomputeConfig
from mellow.store.integrity import verify_store
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig
from mellow.train.data import RowsFromZarr, RowsInMemory

from conftest import TINY_ARGS

DAMAGES = {
    "deleted": lambda path: path.unlink(),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "zero-length": lambda path: path.write_bytes(b""),
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _as_made_before_sizes_were_recorded(store) -> None:
    """Drop the shard file sizes from the markers and meta.json: the checks then go by what the store still has."""
    for marker in (store / "parts").glob("shard-*.json"):
        content = read_json(marker)
        del content["files"]
        write_json_atomic(marker, content)
    meta = read_json(store / "meta.json")
    del meta["shard_bytes"]
    write_json_atomic(store / "meta.json", meta)


@pytest.fixture(params=[(damage, sizes) for damage in sorted(DAMAGES) for sizes in ("sizes", "no-sizes")],
                ids=lambda param: "-".join(param))
def damaged(request, mel_store, tmp_path):
    """A copy of the 24-clip store (3 shards of 8) whose shard 1 file was damaged; (root, store, shard 1's ids).
    no-sizes: a store made before shard file sizes were recorded."""
    root = tmp_path / "shards"
    shutil.copytree(mel_store.parent.parent, root)
    store = root / mel_store.parent.name / mel_store.name
    damage, sizes = request.param
    if sizes == "no-sizes":
        _as_made_before_sizes_were_recorded(store)
    DAMAGES[damage](store / "store.zarr" / "emb" / "c" / "1" / "0" / "0")
    ids = [record["id"] for record in read_jsonl(store / "index.jsonl") if 8 <= record["row"] < 16]
    return root, store, ids


def _verify_message(store) -> str:
    result = CliRunner().invoke(app, ["store", "verify", str(store)])
    assert result.exit_code == 1, result.output
    assert "intact" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("damaged:")]
    return _one_line(line.removeprefix("damaged:"))


def test_verify_names_the_shard_and_its_clips(damaged):
    _, store, ids = damaged
    message = _verify_message(store)
    assert "shard 1" in message and "c/1/0/0" in message
    assert ids[0] in message and ids[-1] in message and "8 clips" in message
    assert "Errno" not in message


@pytest.mark.parametrize("cache", ["ram", "stream"])
def test_training_refuses_a_damaged_shard_with_verifys_message(damaged, tiny_dataset, tmp_path, cache):
    _, store, _ = damaged
    result = CliRunner().invoke(app, ["train", f"--train.store={store}", f"--train.dataset={tiny_dataset}",
                                      f"--train.run_dir={tmp_path / 'run'}", f"--train.data_cache={cache}",
                                      "--train.max_updates=2", "--train.batch_size=4", "--train.val_every=0",
                                      *TINY_ARGS])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert _one_line(line.removeprefix("error:")) == _verify_message(store)


def test_eval_and_ram_readers_refuse_never_zeros(damaged):
    _, store, _ = damaged
    message = _verify_message(store)
    opened = EmbeddingStore(store)
    for reader in (RowsFromZarr, RowsInMemory):
        with pytest.raises(ValueError) as raised:
            reader(opened).read(np.arange(8, 16))
        assert _one_line(str(raised.value)) == message


def test_a_file_removed_after_the_reader_opened_is_refused_too(mel_store, tmp_path):
    """The check at start-up is not the only one: a streamed read of a shard whose file is gone refuses too."""
    root = tmp_path / "shards"
    shutil.copytree(mel_store.parent.parent, root)
    store = root / mel_store.parent.name / mel_store.name
    reader = RowsFromZarr(EmbeddingStore(store))
    (store / "store.zarr" / "emb" / "c" / "2" / "0" / "0").unlink()
    assert zarr.open(str(store / "store.zarr"), mode="r")["emb"][16:24].max() == 0  # what stock zarr gives
    with pytest.raises(ValueError, match="shard 2 .* is missing"):
        reader.read(np.arange(16, 24))


def test_precompute_recomputes_a_damaged_shard(damaged, tiny_dataset, mel_store):
    root, store, _ = damaged
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                              store=StoreConfig(root=root, shard_clips=8))
    result = precompute.run(config)
    assert (result.computed_shards, result.skipped_shards) == (1, 2)
    assert verify_store(store) == []
    original = zarr.open(str(mel_store / "store.zarr"), mode="r")
    repaired = zarr.open(str(store / "store.zarr"), mode="r")
    np.testing.assert_array_equal(original["emb"][:], repaired["emb"][:])
    np.testing.assert_array_equal(original["valid"][:], repaired["valid"][:])
    assert EmbeddingStore(store).meta["complete"]


def test_a_missing_valid_counts_file_is_refused_too(mel_store, tmp_path):
    """`valid` (tokens per clip) would read as 0 for every clip of a shard whose chunk file is gone."""
    root = tmp_path / "shards"
    shutil.copytree(mel_store.parent.parent, root)
    store = root / mel_store.parent.name / mel_store.name
    (store / "store.zarr" / "valid" / "c" / "1").unlink()
    message = _verify_message(store)
    assert "shard 1" in message and "valid/c/1" in message and "is missing" in message
    with pytest.raises(ValueError) as raised:
        RowsFromZarr(EmbeddingStore(store))
    assert _one_line(str(raised.value)) == message


def test_a_damaged_chunk_is_repaired_by_verify_then_precompute(mel_store, tiny_dataset, tmp_path):
    """A flipped byte inside a chunk leaves the file's size as it was: verify finds it, `--repair` takes the shard
    back, and 01_precompute computes it again."""
    root = tmp_path / "shards"
    shutil.copytree(mel_store.parent.parent, root)
    store = root / mel_store.parent.name / mel_store.name
    shard_file = store / "store.zarr" / "emb" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk of shard 1
    shard_file.write_bytes(bytes(data))
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                              store=StoreConfig(root=root, shard_clips=8))
    assert precompute.run(config).computed_shards == 0  # the cheap check (sizes) cannot see it
    result = CliRunner().invoke(app, ["store", "verify", "--repair", str(store)])
    assert result.exit_code == 1 and "checksum" in result.output and "took back 1 shard(s) (1)" in result.output
    assert precompute.run(config).computed_shards == 1
    assert verify_store(store) == []
    np.testing.assert_array_equal(zarr.open(str(mel_store / "store.zarr"), mode="r")["emb"][:],
                                  zarr.open(str(store / "store.zarr"), mode="r")["emb"][:])
