"""`mellow ask`: audio files decoded and encoded on the fly as the store encoded them, answers as eval's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mellow.cli import app
from mellow.config import from_names
from mellow.encode.encoders import build_encoder
from mellow.evaluate import ask, score
from mellow.files import read_json, read_jsonl
from mellow.settings import AskConfig, EncoderConfig, EvalConfig, ModelConfig, TrainConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreMismatchError
from mellow.train import loop

from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def run_dir(mel_store, tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ask") / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=60,
                        batch_size=8,
                          lr=1e-2, warmup_updates=2, val_every=0, save_every=60), ModelConfig(**TINY_MODEL))
    return run_dir


def _audio_paths(dataset):
    return {record["id"]: dataset / record["path"] for record in read_jsonl(dataset / "audio.jsonl")}


def test_files_are_encoded_exactly_as_the_store_holds_them(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    encoder = ask.encoder_of_store(store.fingerprint, "cpu")
    paths = _audio_paths(tiny_dataset)
    ids = [record["id"] for record in store.index][:6]
    embeddings, valid = ask.encode_files(encoder, [paths[i] for i in ids])
    stored, stored_valid = store.load_all()  # (N, V, T, D) float16, (N, V)
    rows = [store.rows[i] for i in ids]
    torch.testing.assert_close(embeddings, torch.from_numpy(stored[rows, 0]).float(), rtol=2e-3, atol=2e-3)
    assert valid.tolist() == stored_valid[rows, 0].tolist()
    assert len(set(valid.tolist())) > 1  # clips of different lengths: the valid counts are really compared


def test_answers_are_the_ones_eval_gives_from_the_store(run_dir, tiny_dataset):
    result = score.run(EvalConfig(run=run_dir, split="test", max_new_tokens=8, batch_size=7))
    predictions = read_jsonl(result.output_dir / "predictions.jsonl")
    paths = _audio_paths(tiny_dataset)
    one = next(p for p in predictions if p["audio2"] is None)
    two = next(p for p in predictions if p["audio2"] is not None)
    config = AskConfig(checkpoint=run_dir, max_new_tokens=8)
    for example in (one, two):
        files = [paths[example["audio1"]]] + ([paths[example["audio2"]]] if example["audio2"] else [])
        assert ask.ask(config, files, example["prompt"]) == example["prediction"]
    assert len({p["prediction"] for p in predictions}) > 1  # answers depend on the input


def test_ask_command_prints_the_answer_and_refuses_bad_input(run_dir, tiny_dataset, tmp_path):
    runner = CliRunner()
    clip = next(iter(_audio_paths(tiny_dataset).values()))
    answered = runner.invoke(app, ["ask", str(clip), "Describe the audio.", "--checkpoint", str(run_dir),
                                   "--beams", "2"])
    assert answered.exit_code == 0, answered.output
    assert answered.output.strip().splitlines()[-1].strip()  # an answer line

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    silent = tmp_path / "silent.wav"
    from mellow.audio.decode import encode_audio_file

    encode_audio_file(np.zeros(16000, dtype=np.float32), 16000, silent)
    cases = [
        ([str(clip)], "one or two audio files and then the prompt"),
        ([str(clip), str(clip), str(clip), "What?"], "one or two audio files before the prompt, not 3"),
        ([str(tmp_path / "missing.wav"), "What?"], "missing.wav: no such audio file"),
        ([str(corrupt), "What?"], "corrupt.wav"),
        ([str(silent), "What?"], "digital silence"),
        ([str(clip), "  "], "the prompt is empty"),
    ]
    for arguments, message in cases:
        refused = runner.invoke(app, ["ask", *arguments, "--checkpoint", str(run_dir)])
        assert refused.exit_code == 2, (arguments, refused.output)
        assert message in " ".join(refused.output.split()), (arguments, refused.output)


def test_ask_refuses_an_encoder_that_differs_from_the_checkpoints_store(run_dir, tiny_dataset, tmp_path):
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run_dir / read_json(run_dir / "latest.json")["path"], checkpoint)
    trainer = read_json(checkpoint / "trainer.json")
    trainer["store_fingerprint"]["weights_hash"] = "0123abcd"
    (checkpoint / "trainer.json").write_text(json.dumps(trainer))
    clip = next(iter(_audio_paths(tiny_dataset).values()))
    with pytest.raises(StoreMismatchError, match="weights_hash: expected '0123abcd'"):
        ask.ask(AskConfig(checkpoint=checkpoint), [clip], "Describe the audio.")
    assert build_encoder(EncoderConfig(name="mel")).weights_hash != "0123abcd"
