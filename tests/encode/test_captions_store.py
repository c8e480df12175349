"""Caption text embeddings (for 02_align) through the same store machinery as audio: stock-zarr readable,
equal to the sentence encoder's own output, verified, and grown with the dataset."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mellow.cli import app
from mellow.encode import captions
from mellow.encode.captions import dataset_captions
from mellow.files import read_json, read_jsonl, write_jsonl_atomic
from mellow.settings import CaptionsConfig, TextEncoderConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig


def _store(root, dataset):
    return captions.run(CaptionsConfig(dataset=dataset, store=StoreConfig(root=root, shard_clips=16))).store_path


def test_caption_store_equals_the_sentence_encoder_and_verifies(tiny_dataset, tmp_path):
    from sentence_transformers import SentenceTransformer

    result = CliRunner().invoke(app, ["precompute-captions", str(tiny_dataset), "--store-root", str(tmp_path),
                                      "--shard-clips", "16"])
    assert result.exit_code == 0, result.output
    [store_path] = (tmp_path / "synth").iterdir()
    assert store_path.name.startswith("captions-all-MiniLM-L6-v2-")
    caption_rows = dataset_captions(tiny_dataset)
    references = {e["audio1"]: e["references"] for e in read_jsonl(tiny_dataset / "train.jsonl")
                  if e["task"] == "caption"}
    some_clip = next(iter(references))
    assert [c["text"] for c in caption_rows if c["clip"] == some_clip] == references[some_clip]
    group = zarr.open(str(store_path / "store.zarr"), mode="r")
    assert group["emb"].shape == (len(caption_rows), 1, 384) and group["emb"].dtype == np.float16
    index = read_jsonl(store_path / "index.jsonl")
    assert [r["id"] for r in index] == [c["id"] for c in caption_rows] and index[0]["text"] == caption_rows[0]["text"]
    model = SentenceTransformer(str(captions.bundled_text_encoder_dir()), device="cpu")
    rows = [0, len(caption_rows) // 2, len(caption_rows) - 1]
    expected = model.encode([caption_rows[row]["text"] for row in rows], convert_to_numpy=True)
    np.testing.assert_allclose(group["emb"][rows][:, 0].astype(np.float32), expected, atol=2e-3)
    norms = np.linalg.norm(group["emb"][:][:, 0].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=3e-3)  # all-MiniLM-L6-v2 normalises its embeddings
    fingerprint = read_json(store_path / "meta.json")["fingerprint"]
    assert fingerprint["kind"] == "text" and fingerprint["normalized"] and fingerprint["dim"] == 384
    result = CliRunner().invoke(app, ["store", "verify", str(store_path)])
    assert result.exit_code == 0 and "verified" in result.output
    store = EmbeddingStore(store_path)
    assert store.load_all()[0].shape == (len(caption_rows), 1, 1, 384)


def test_caption_store_grows_with_appended_clips_and_skips_an_empty_caption(tiny_dataset, tmp_path):
    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset)
    records = read_jsonl(dataset / "audio.jsonl")
    write_jsonl_atomic(dataset / "audio.jsonl", records[:12])  # captions of the other clips are left out
    first = _store(tmp_path / "shards", dataset)
    before = zarr.open(str(first / "store.zarr"), mode="r")["emb"][:]
    write_jsonl_atomic(dataset / "audio.jsonl", records)
    appended = {r["id"] for r in records[12:]}
    train = read_jsonl(dataset / "train.jsonl")
    new_clip_caption = next(e for e in train if e["task"] == "caption" and e["audio1"] in appended)
    new_clip_caption["references"][-1] = "   "
    write_jsonl_atomic(dataset / "train.jsonl", train)
    result = captions.run(CaptionsConfig(dataset=dataset, store=StoreConfig(root=tmp_path / "shards", shard_clips=16),
                                     max_failures=0.05))
    assert result.store_path == first and result.skipped_shards == len(before) // 16
    after = zarr.open(str(first / "store.zarr"), mode="r")["emb"][:]
    np.testing.assert_array_equal(after[: len(before) // 16 * 16], before[: len(before) // 16 * 16])
    statuses = {r["id"]: r["status"] for r in read_jsonl(first / "index.jsonl")}
    assert list(statuses.values()).count("failed: empty caption") == 1
    assert len(statuses) == len(dataset_captions(dataset))


def test_a_changed_caption_is_refused_and_changed_audio_is_encoded_again(tiny_dataset, mel_store, tmp_path):
    from mellow.encode import precompute
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.store.writer import StoreMismatchError

    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset)
    store_path = _store(tmp_path / "shards", dataset)
    train = read_jsonl(dataset / "train.jsonl")
    caption = next(e for e in train if e["task"] == "caption")
    caption["references"][0] = "a completely different caption"
    write_jsonl_atomic(dataset / "train.jsonl", train)
    with pytest.raises(StoreMismatchError, match=f"{caption['audio1']}#0 .* its caption text differs"):
        _store(tmp_path / "shards", dataset)
    assert read_json(store_path / "meta.json")["complete"]  # refused before anything was touched

    # audio.jsonl records other audio for clip 3 than the one encoded (and than its file holds): its shard is
    # encoded again (tests/test_audio_changes.py follows a real edit), and the clip, whose file does not match
    # audio.jsonl, is not stored as encoded
    shutil.copytree(mel_store.parent.parent, tmp_path / "audio-shards")
    records = read_jsonl(dataset / "audio.jsonl")
    records[3]["sha256"] = "0" * 64
    write_jsonl_atomic(dataset / "audio.jsonl", records)
    config = PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                              store=StoreConfig(root=tmp_path / "audio-shards", shard_clips=8))
    result = precompute.run(config)
    assert (result.computed_shards, result.skipped_shards) == (1, 2)
    status = {record["id"]: record["status"] for record in read_jsonl(result.store_path / "index.jsonl")}
    assert "does not match the sha256" in status[records[3]["id"]]


def test_unknown_text_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="use all-MiniLM-L6-v2 or st:"):
        TextEncoderConfig(name="bert-huge")
    with pytest.raises(ValueError, match="is not a directory"):
        TextEncoderConfig(name=f"st:{tmp_path / 'none'}")


def test_a_caption_shard_whose_file_is_gone_is_computed_again(tiny_dataset, tmp_path):
    store_path = _store(tmp_path / "shards", tiny_dataset)
    before = zarr.open(str(store_path / "store.zarr"), mode="r")["emb"][:]
    (store_path / "store.zarr" / "emb" / "c" / "1" / "0" / "0").unlink()
    result = captions.run(CaptionsConfig(dataset=tiny_dataset, store=StoreConfig(root=tmp_path / "shards",
                                                                             shard_clips=16)))
    assert result.computed_shards == 1
    np.testing.assert_array_equal(zarr.open(str(store_path / "store.zarr"), mode="r")["emb"][:], before)
    assert read_json(store_path / "meta.json")["complete"]
