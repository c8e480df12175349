"""The store: readable with stock zarr, equal to direct encoder output, sharded/checksummed, resumable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from mellow.audio.decode import decode_audio, fit_length
from mellow.encode import precompute
from mellow.encode.encoders import build_encoder
from mellow.files import read_json, read_jsonl
from mellow.settings import EncoderConfig, PrecomputeConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig, StoreMismatchError


def _direct_embeddings(dataset, encoder_config, ids):
    """Decode and encode clips one at a time, outside the pipeline."""
    encoder = build_encoder(encoder_config)
    records = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    rows = []
    for clip_id in ids:
        waveform = decode_audio(dataset / records[clip_id]["path"], encoder.sample_rate)
        fitted, fraction = fit_length(waveform, int(encoder_config.clip_seconds * encoder.sample_rate), "pad")
        embedding, valid = encoder.encode(fitted[None], np.array([fraction]))
        rows.append((embedding[0], valid[0]))
    return rows


def test_whisper_store_read_with_stock_zarr_equals_direct_encoder_output(tiny_dataset, tmp_path):
    encoder_config = EncoderConfig(name="whisper-tiny", clip_seconds=3.0, tokens=6, batch_size=5)
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=encoder_config,
                              store=StoreConfig(root=tmp_path, shard_clips=10))
    store_path = precompute.run(config).store_path
    group = zarr.open(str(store_path / "store.zarr"), mode="r")
    emb, valid = group["emb"], group["valid"]
    assert emb.shape == (24, 6, 384) and emb.dtype == np.float16
    assert emb.chunks == (1, 6, 384) and emb.shards == (10, 6, 384)
    codecs = json.dumps(json.loads((store_path / "store.zarr" / "emb" / "zarr.json").read_text()))
    assert "sharding_indexed" in codecs and "zstd" in codecs and "crc32c" in codecs
    index = read_jsonl(store_path / "index.jsonl")
    ids = [index[0]["id"], index[13]["id"], index[23]["id"]]
    for clip_id, (expected, expected_valid) in zip(ids, _direct_embeddings(tiny_dataset, encoder_config, ids)):
        row = next(r["row"] for r in index if r["id"] == clip_id)
        np.testing.assert_allclose(emb[row].astype(np.float32), expected.astype(np.float32), atol=2e-2, rtol=1e-2)
        assert valid[row] == expected_valid
    meta = read_json(store_path / "meta.json")
    assert meta["complete"] and meta["counts"] == {"rows": 24, "ok": 24, "failed": 0}
    fingerprint = meta["fingerprint"]
    assert fingerprint["encoder"] == "whisper-tiny" and len(fingerprint["weights_hash"]) == 16
    assert (fingerprint["sample_rate"], fingerprint["clip_seconds"], fingerprint["crop"], fingerprint["tokens"],
            fingerprint["dtype"]) == (16000, 3.0, "pad", 6, "float16")


def test_valid_tokens_follow_clip_duration(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    durations = {r["id"]: r["duration"] for r in read_jsonl(tiny_dataset / "audio.jsonl")}
    _, valid = store.load_all()
    for record in store.index:
        expected = min(4, int(np.ceil(min(durations[record["id"]], 3.0) / 3.0 * 4 - 1e-3)))
        assert abs(int(valid[record["row"], 0]) - expected) <= 1


def test_rerun_skips_done_shards_and_recomputes_an_uncommitted_one(mel_store, tiny_dataset, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(mel_store.parent.parent, root)
    copy = root / mel_store.parent.name / mel_store.name
    before = zarr.open(str(copy / "store.zarr"), mode="r")["emb"][:]
    # A shard without its marker counts as unwritten, even though a (here truncated) file is there.
    (copy / "parts" / "shard-00001.json").unlink()
    shard_file = copy / "store.zarr" / "emb" / "c" / "1" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                              store=StoreConfig(root=root, shard_clips=8))
    result = precompute.run(config)
    assert result.store_path == copy
    assert (result.computed_shards, result.skipped_shards) == (1, 2)
    np.testing.assert_array_equal(zarr.open(str(copy / "store.zarr"), mode="r")["emb"][:], before)


def test_existing_store_with_other_rows_is_refused(mel_store, tiny_dataset, tmp_path):
    from mellow.store.writer import StoreWriter

    meta = read_json(mel_store / "meta.json")
    with pytest.raises(StoreMismatchError, match="rows"):
        StoreWriter(mel_store, 99, meta["fingerprint"], StoreConfig())


@pytest.mark.parametrize("family", ["whisper", "clap"])
def test_huggingface_encoders_from_a_local_folder(tmp_path, family):
    import torch

    torch.manual_seed(0)
    if family == "whisper":
        from transformers import WhisperConfig, WhisperModel

        WhisperModel(WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                   vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   decoder_start_token_id=1)).save_pretrained(tmp_path)
        expected_dim = 32
    else:
        from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

        audio = ClapAudioConfig(depths=[1, 1], num_attention_heads=[2, 2], hidden_size=16,
                                patch_embeds_hidden_size=16, projection_dim=16, spec_size=256, window_size=8)
        text = ClapTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, projection_dim=16)
        ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(tmp_path)
        expected_dim = 32
    encoder = build_encoder(EncoderConfig(name=f"hf:{tmp_path}", clip_seconds=2.0, tokens=5))
    waves = np.random.default_rng(0).normal(0, 0.1, (2, int(2.0 * encoder.sample_rate))).astype(np.float32)
    embeddings, valid = encoder.encode(waves, np.array([1.0, 0.4]))
    assert embeddings.shape == (2, 5, expected_dim) and valid.tolist() == [5, 2]
    assert np.isfinite(embeddings.astype(np.float32)).all() and embeddings.std() > 0
    assert len(encoder.weights_hash) == 16


def test_unknown_encoder_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown; use one of whisper-tiny, mel"):
        EncoderConfig(name="wav2vec-huge")
    with pytest.raises(ValueError, match="is not a directory"):
        EncoderConfig(name=f"hf:{tmp_path / 'nothing'}")


def test_a_store_over_its_failure_budget_says_what_it_kept_and_is_complete_only_once_accepted(tiny_dataset,
                                                                                               tmp_path):
    from typer.testing import CliRunner

    from mellow.cli import app

    dataset = tmp_path / "broken"
    shutil.copytree(tiny_dataset, dataset)
    records = read_jsonl(dataset / "audio.jsonl")
    (dataset / records[2]["path"]).write_bytes(b"not audio at all" * 64)  # corrupt
    (dataset / records[5]["path"]).unlink()  # missing
    arguments = ["precompute", str(dataset), "--encoder", "mel", "--tokens", "4", "--clip-seconds", "3",
                 "--store-root", str(tmp_path / "shards")]
    result = CliRunner().invoke(app, arguments + ["--max-failures", "0.05"])
    [store_path] = list((tmp_path / "shards" / "broken").iterdir())
    said = " ".join(result.output.split())
    assert result.exit_code == 1
    assert (f"22 of 24 clips encoded (2 failed: see {store_path / 'report.json'}); the store is usable; to accept "
            f"it run `uv run mellow store finalize {store_path} --max-failures 0.09`") in said
    report = read_json(store_path / "report.json")
    assert {failure["id"] for failure in report["failures"]} == {records[2]["id"], records[5]["id"]}
    assert all(failure["reason"].startswith("failed: ") for failure in report["failures"])
    assert not read_json(store_path / "meta.json")["complete"]
    with pytest.raises(ValueError, match="2 of 24 clips failed.*--max-failures 0.09"):
        EmbeddingStore(store_path)  # training and eval do not take it as complete
    result = CliRunner().invoke(app, ["store", "info", str(store_path)])
    assert result.exit_code == 2 and "not accepted" in result.output
    result = CliRunner().invoke(app, ["store", "finalize", str(store_path), "--max-failures", "0.09"])
    assert result.exit_code == 0 and "22 clips ok, 2 failed" in result.output, result.output
    store = EmbeddingStore(store_path)
    assert len(store.rows) == 22 and records[2]["id"] not in store.rows
    result = CliRunner().invoke(app, arguments + ["--max-failures", "0.1"])  # a rerun computes nothing again
    assert result.exit_code == 0 and "0 shard(s) computed" in result.output, result.output


def test_store_verify_names_the_clip_and_shard_of_a_flipped_byte(mel_store, tmp_path):
    from typer.testing import CliRunner

    from mellow.cli import app

    copy = tmp_path / "store"
    shutil.copytree(mel_store, copy)
    result = CliRunner().invoke(app, ["store", "verify", str(copy)])
    assert result.exit_code == 0 and "verified" in result.output
    result = CliRunner().invoke(app, ["store", "info", str(copy)])
    assert result.exit_code == 0 and "bytes_per_clip" in result.output and "encoder: mel" in result.output
    shard = copy / "store.zarr" / "emb" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk of shard 1 (rows 8..15)
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["store", "verify", str(copy)])
    assert result.exit_code == 1
    index = read_jsonl(copy / "index.jsonl")
    assert f"clip {index[8]['id']} (row 8) in shard 1" in result.output
    assert "checksum" in result.output and result.output.count("damaged:") == 1  # the other clips read fine


def test_export_to_webdataset_reads_back_with_stock_webdataset(mel_store, tmp_path):
    import webdataset
    from typer.testing import CliRunner

    from mellow.cli import app

    out = tmp_path / "wds"
    result = CliRunner().invoke(app, ["store", "export-wds", str(mel_store), str(out), "--clips-per-tar", "10"])
    assert result.exit_code == 0, result.output
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))
    assert len(tars) == 3 and not (out / ".partial").exists()
    assert read_json(out / "meta.json")["fingerprint"] == read_json(mel_store / "meta.json")["fingerprint"]
    group = zarr.open(str(mel_store / "store.zarr"), mode="r")
    samples = list(webdataset.WebDataset(tars, shardshuffle=False).decode())
    assert len(samples) == 24
    for sample in samples:
        record = sample["json"]
        np.testing.assert_array_equal(sample["npy"], group["emb"][record["row"]])
        assert sample["npy"].dtype == np.float16 and record["valid"] == group["valid"][record["row"]]
