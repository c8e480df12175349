"""Shared fixtures: a small synthetic dataset with real audio files and a mel-encoder store made from it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from mellow.audio.decode import find_ffmpeg
from mellow.cli import app
from mellow.config import from_names
from mellow.encode import precompute
from mellow.files import read_json, read_jsonl
from mellow.settings import EncoderConfig, PrecomputeConfig, TrainConfig
from mellow.sources import prepare
from mellow.sources.config import PrepareConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig

# Training logs to W&B when the environment asks for it (a W&B API key or WANDB_MODE): "disabled" keeps it off
# here, for the tests and the processes they start, whatever the machine holds. tests/test_tracking.py runs it.
os.environ["WANDB_MODE"] = "disabled"

TINY_MODEL = {"decoder": "tiny", "tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2}
# the same as 03_train options, for tests that start training processes
TINY_ARGS = [f"--model.{key}={value}" for key, value in TINY_MODEL.items()] + ["--model.projector_dropout=0.0"]


def save_tiny_llama(folder: Path) -> Path:
    """A tiny randomly initialised Llama and SmolLM2's tokenizer saved with save_pretrained, as a user's local
    decoder folder would be (for `--model.decoder hf:<folder>`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mellow.model.decoders import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_config(store: Path, dataset: Path, run_dir: Path, **overrides) -> TrainConfig:
    """A short, seeded training config for tests; `overrides` replace any field."""
    values = dict(store=store, dataset=dataset, run_dir=run_dir, max_updates=8, batch_size=4, lr=3e-3,
                  warmup_updates=2, val_every=0, save_every=4, log_every=1, seed=5)
    return from_names(TrainConfig, **{**values, **overrides})


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{update: training loss} from a run's metrics.jsonl."""
    return {row["update"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a run's latest checkpoint."""
    return torch.load(run_dir / read_json(run_dir / "latest.json")["path"] / "model.pt")


def invoke_ok(*arguments: str):
    """A `mellow` command run in this process; it must succeed (its output is the message if not)."""
    result = CliRunner().invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result


def rows_by_id(store_path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """{clip id: (its embedding, its valid tokens)} of a store."""
    store = EmbeddingStore(store_path)
    emb, valid = store.load_all()
    return {clip: (emb[row], int(valid[row, 0])) for clip, row in store.rows.items()}


def assert_same_store(first: Path, second: Path) -> None:
    """Two stores hold the same embeddings, index and fingerprint, read back with stock zarr."""
    a, b = zarr.open(str(first / "store.zarr"), mode="r"), zarr.open(str(second / "store.zarr"), mode="r")
    np.testing.assert_array_equal(a["emb"][:], b["emb"][:])
    np.testing.assert_array_equal(a["valid"][:], b["valid"][:])
    assert read_jsonl(first / "index.jsonl") == read_jsonl(second / "index.jsonl")
    assert read_json(first / "meta.json")["fingerprint"] == read_json(second / "meta.json")["fingerprint"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    return prepare.run(PrepareConfig(root=root, num_clips=24, max_seconds=3.0, seed=3))


@pytest.fixture(scope="session")
def mel_store(tiny_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                              store=StoreConfig(root=root, shard_clips=8))
    return precompute.run(config).store_path


# MELD.Raw's exact layout (tests/sources/test_meld.py, tests/test_emotion_chain.py)
HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
# (dialogue, utterance, text as bytes in the file, emotion, sentiment)
ROWS = {
    "train": [(0, 0, "Oh my God, you\u2019re here!".encode(), "surprise", "positive"),
              (0, 1, b"I don\x92t want to talk about it.", "anger", "negative"),  # cp1252 apostrophe
              (1, 0, "It\u00e2\u20ac\u2122s fine, really.".encode(), "neutral", "neutral"),  # mojibake of It’s
              (1, 1, b"Great.", "joy", "positive")],
    "val": [(0, 0, b"Why would you do that?", "anger", "negative"), (0, 1, b"I'm sorry.", "sadness", "negative"),
            (1, 0, b"Hi.", "neutral", "neutral")],  # dia1_utt0 of dev is missing, as some are in the real set
    "test": [(0, 0, b"Ew!", "disgust", "negative"), (0, 1, b"Watch out!", "fear", "negative")],
}
FILES = {"train": ("train_sent_emo.csv", "train_splits"), "val": ("dev_sent_emo.csv", "dev_splits_complete"),
         "test": ("test_sent_emo.csv", "output_repeated_splits_test")}


def _video(path: Path, hertz: int) -> None:
    """A 1.2 s mp4 with a small test-pattern video track and an AAC sine audio track, as MELD's clips hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([find_ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10",
                    "-f", "lavfi", "-i", f"sine=frequency={hertz}:sample_rate=44100", "-t", "1.2",
                    "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(path)], check=True, timeout=60)


@pytest.fixture(scope="session")
def meld_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MELD.Raw")
    for split, rows in ROWS.items():
        table, folder = FILES[split]
        lines = [HEADER.encode()]
        for number, (dialogue, utterance, text, emotion, sentiment) in enumerate(rows, start=1):
            lines.append(b'%d,"%s",Joey,%s,%s,%d,%d,1,1,"00:00:01,000","00:00:02,000"\n' % (
                number, text, emotion.encode(), sentiment.encode(), dialogue, utterance))
            if not (split == "val" and (dialogue, utterance) == (1, 0)):
                _video(root / folder / f"dia{dialogue}_utt{utterance}.mp4", 300 + 100 * number)
        (root / table).write_bytes(b"".join(lines))
    return root
