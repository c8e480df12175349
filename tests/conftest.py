"""Shared fixtures: a small synthetic dataset with real audio files and a mel-encoder store made from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mellow import precompute, prepare
from mellow.encoders import EncoderConfig
from mellow.precompute import PrecomputeConfig
from mellow.prepare import PrepareConfig
from mellow.store import StoreConfig

# Training logs to W&B when wandb is installed (it is, as a dev dependency); tests that do not test it turn it
# off, for them and the processes they start. tests/test_tracking.py runs it offline.
os.environ["WANDB_MODE"] = "disabled"

TINY_MODEL = {"decoder": "tiny", "tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2}


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
