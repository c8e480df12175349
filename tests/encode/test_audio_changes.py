"""Edited audio is noticed. 01_precompute records each clip's file size and modification time, checks the sha256
where they changed (or always, with --check-audio), refuses a clip whose file no longer matches audio.jsonl, and
re-encodes one whose audio.jsonl entry 00_prepare updated; 00_prepare with the same config re-checks its audio
and reports what changed; a run trained on the old embeddings is told on --resume."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from mellow.audio.decode import decode_audio, encode_audio_file
from mellow.cli import app
from mellow.encode import precompute
from mellow.files import read_json, read_jsonl, sha256_file
from mellow.settings import EncoderConfig, PrecomputeConfig
from mellow.sources import prepare
from mellow.sources.config import PrepareConfig
from mellow.store.writer import StoreConfig

from conftest import TINY_ARGS, assert_same_store

TINY_PREPARE = dict(num_clips=24, max_seconds=3.0, seed=3)  # the config tiny_dataset was prepared with


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    """A copy of the tiny synthetic dataset that a test may edit."""
    copy = tmp_path / "datasets" / tiny_dataset.name
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


def _precompute(dataset, root, **options):
    return precompute.run(PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0,
                                                                                     tokens=4),
                                           store=StoreConfig(root=root, shard_clips=8), **options))


def _records(dataset) -> dict[str, dict]:
    return {record["id"]: record for record in read_jsonl(dataset / "audio.jsonl")}


def _replace_audio(dataset, clip_id: str) -> None:
    """Overwrite one clip's file with other audio, in the same format (a user's edit)."""
    path = dataset / _records(dataset)[clip_id]["path"]
    tone = 0.3 * np.sin(2 * np.pi * 1234.0 * np.arange(32000) / 16000).astype(np.float32)
    encode_audio_file(tone, 16000, path)


def _clip_in_shard_1(dataset) -> str:
    return list(_records(dataset))[10]  # rows 8-15 are shard 1


def test_edited_audio_is_refused_then_recorded_by_prepare_then_re_encoded(dataset, tmp_path, capsys):
    store = _precompute(dataset, tmp_path / "shards").store_path
    clip = _clip_in_shard_1(dataset)
    _replace_audio(dataset, clip)
    with pytest.raises(ValueError, match=f"{clip}.*changed.*00_prepare"):
        _precompute(dataset, tmp_path / "shards")
    capsys.readouterr()
    prepare.run(PrepareConfig(root=dataset.parent, **TINY_PREPARE))
    said = capsys.readouterr().out
    assert clip in said and "changed" in said and "1 of 24" in said
    assert _records(dataset)[clip]["sha256"] == sha256_file(dataset / _records(dataset)[clip]["path"])
    result = _precompute(dataset, tmp_path / "shards")
    assert (result.computed_shards, result.skipped_shards) == (1, 2)
    assert read_json(store / "meta.json")["revision"] == 1
    fresh = _precompute(dataset, tmp_path / "fresh").store_path  # the edited dataset, encoded from nothing
    assert_same_store(store, fresh)
    assert _precompute(dataset, tmp_path / "shards").computed_shards == 0  # and now nothing is left to do


def test_a_file_that_does_not_match_its_sha256_is_never_stored_ok(dataset, tmp_path):
    clip = _clip_in_shard_1(dataset)
    _replace_audio(dataset, clip)
    store = _precompute(dataset, tmp_path / "shards", max_failures=0.5).store_path
    [record] = [record for record in read_jsonl(store / "index.jsonl") if record["id"] == clip]
    assert record["status"] != "ok" and "sha256" in record["status"]


def test_check_audio_finds_an_edit_that_kept_size_and_modification_time(dataset, tmp_path):
    _precompute(dataset, tmp_path / "shards")
    clip = next(clip for clip, record in _records(dataset).items() if record["path"].endswith(".wav"))
    path = dataset / _records(dataset)[clip]["path"]
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # other samples, the same length
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _precompute(dataset, tmp_path / "shards").computed_shards == 0  # the cheap check cannot see it
    with pytest.raises(ValueError, match=f"{clip}.*changed"):
        _precompute(dataset, tmp_path / "shards", check_audio=True)


def test_prepare_overwrite_rebuilds_a_dataset_made_with_the_same_config(dataset, tmp_path):
    clip = _clip_in_shard_1(dataset)
    path = dataset / _records(dataset)[clip]["path"]
    original = tmp_path / f"original{path.suffix}"
    shutil.copy(path, original)
    _replace_audio(dataset, clip)
    prepare.run(PrepareConfig(root=dataset.parent, overwrite=True, **TINY_PREPARE))
    assert sha256_file(path) == _records(dataset)[clip]["sha256"]
    # the clip's own audio again (an Ogg file's bytes differ from one writing to the next: its stream serial)
    np.testing.assert_array_equal(decode_audio(path, 16000), decode_audio(original, 16000))


def test_a_run_trained_on_the_old_embeddings_is_told_on_resume(dataset, tmp_path):
    store = _precompute(dataset, tmp_path / "shards").store_path
    run_dir = tmp_path / "run"
    arguments = [f"--train.store={store}", f"--train.dataset={dataset}", f"--train.run_dir={run_dir}",
                 "--train.max_updates=4", "--train.batch_size=4", "--train.val_every=0", "--train.data_workers=0",
                 *TINY_ARGS]
    first = CliRunner().invoke(app, ["train", *arguments, "--train.stop_after=2"])
    assert first.exit_code == 0, first.output
    clip = _clip_in_shard_1(dataset)
    _replace_audio(dataset, clip)
    prepare.run(PrepareConfig(root=dataset.parent, **TINY_PREPARE))
    _precompute(dataset, tmp_path / "shards")
    resumed = CliRunner().invoke(app, ["train", f"--train.run_dir={run_dir}", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "re-encoded" in said and clip in said
