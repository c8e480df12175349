"""Several views (crops) per long clip: what precompute stores, and how training draws one per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mellow.audio.decode import decode_audio, encode_audio_file
from mellow.audio.views import view_offsets
from mellow.config import from_names
from mellow.encode import precompute
from mellow.encode.encoders import build_encoder
from mellow.files import read_jsonl, write_jsonl_atomic
from mellow.model.decoders import load_tokenizer
from mellow.settings import EncoderConfig, ModelConfig, PrecomputeConfig, TrainConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig
from mellow.train import loop
from mellow.train.data import ExampleSet, load_examples

from conftest import TINY_MODEL

RATE = 16000


def _tones(frequencies: list[float], seconds_each: float) -> np.ndarray:
    t = np.arange(int(seconds_each * RATE)) / RATE
    return np.concatenate([0.2 * np.sin(2 * np.pi * f * t) for f in frequencies]).astype(np.float32)


def test_view_offsets_spread_from_start_to_end():
    assert view_offsets(10.0, 2.0, 3, "pad") == [0.0, 4.0, 8.0]
    assert view_offsets(3.0, 2.0, 4, "pad") == [0.0, 1.0]  # at most ceil(duration / clip) views
    assert view_offsets(1.5, 2.0, 4, "pad") == [0.0]  # a short clip has one view
    assert view_offsets(10.0, 2.0, 1, "center") == [4.0]
    assert view_offsets(10.0, 2.0, 1, "pad") == [0.0]


def test_long_clips_store_spread_views_equal_to_encoding_those_crops(tmp_path):
    dataset = tmp_path / "views"
    dataset.mkdir()
    long = _tones([220, 440, 660, 880, 1100], 2.0)  # 10 s, a new pitch every 2 s
    encode_audio_file(long, RATE, dataset / "long.wav")
    encode_audio_file(_tones([330], 1.5), RATE, dataset / "short.wav")
    encode_audio_file(_tones([500, 900], 2.0), RATE, dataset / "medium.wav")
    write_jsonl_atomic(dataset / "audio.jsonl", [
        {"id": "long", "path": "long.wav", "duration": 10.0},
        {"id": "short", "path": "short.wav", "duration": 1.5},
        {"id": "medium", "path": "medium.wav", "duration": 4.0},
        {"id": "long-no-duration", "path": "long.wav"},  # decoded whole once, then cut
    ])
    encoder_config = EncoderConfig(name="mel", clip_seconds=2.0, tokens=4, views=3)
    result = precompute.run(PrecomputeConfig(dataset=dataset, encoder=encoder_config,
                                             store=StoreConfig(root=tmp_path / "shards", shard_clips=2)))
    assert result.store_path.name.startswith("mel-2s-4tok-3views-")
    group = zarr.open(str(result.store_path / "store.zarr"), mode="r")  # stock zarr sees the views axis
    assert group["emb"].shape == (4, 3, 4, 80) and group["emb"].chunks == (1, 3, 4, 80)
    assert group["valid"].shape == (4, 3)
    valid = group["valid"][:]
    assert valid.tolist() == [[4, 4, 4], [3, 0, 0], [4, 4, 0], [4, 4, 4]]
    emb = group["emb"][:].astype(np.float32)
    encoder = build_encoder(encoder_config)
    decoded = decode_audio(dataset / "long.wav", RATE)  # the 16-bit file, as ffmpeg reads it
    for view, start in enumerate([0.0, 4.0, 8.0]):  # views of the 10 s clip start at 0, 4 and 8 s
        crop = decoded[int(start * RATE) : int((start + 2.0) * RATE)]
        expected, _ = encoder.encode(crop[None].copy(), np.array([1.0]))
        np.testing.assert_allclose(emb[0, view], expected[0].astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(emb[3], emb[0], atol=2e-2)  # without a duration: the same crops
    assert not emb[1, 1:].any() and not emb[2, 2].any()  # views a clip lacks stay zero
    assert np.abs(emb[0, 0] - emb[0, 2]).mean() > 0.1  # different pitches, different views
    assert EmbeddingStore(result.store_path).views == 3


@pytest.fixture(scope="module")
def views_store(tiny_dataset, tmp_path_factory):
    config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=1.0, tokens=4,
                                                                          views=3),
                              store=StoreConfig(root=tmp_path_factory.mktemp("views"), shard_clips=8))
    return precompute.run(config).store_path


def test_training_draws_one_view_per_clip_and_epoch(views_store, tiny_dataset):
    store = EmbeddingStore(views_store)
    durations = {r["id"]: r["duration"] for r in read_jsonl(tiny_dataset / "audio.jsonl")}
    examples = ExampleSet(load_examples(tiny_dataset, "train"), store, load_tokenizer("tiny"), 64, seed=3)
    counts = examples.view_counts.tolist()
    for record in store.index:
        assert counts[record["row"]] == min(3, int(np.ceil(durations[record["id"]] / 1.0)))
    epochs = [examples.views_of_epoch(epoch) for epoch in range(4)]
    assert torch.equal(epochs[1], examples.views_of_epoch(1))  # a pure function of (seed, epoch)
    assert all((views < examples.view_counts).all() for views in epochs)
    assert any(not torch.equal(epochs[0], other) for other in epochs[1:])
    assert len({views[row] for views in epochs for row in range(len(counts)) if counts[row] == 3}) > 1
    assert not examples.views_of_epoch(None).any()  # evaluation: the first view
    batch = examples.batch([0, 1, 2], epoch=2)
    assert batch["audio1"].shape == (3, 4, 80)


def test_resume_on_a_views_store_gives_the_same_losses(views_store, tiny_dataset, tmp_path):
    def config(run_dir, **extra):
        return from_names(TrainConfig, store=views_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=12,
                          batch_size=32,
                          warmup_updates=2, val_every=6, save_every=6, log_every=1, seed=5, **extra)

    model = ModelConfig(**TINY_MODEL)
    loop.run(config(tmp_path / "straight"), model)  # 184 examples: 5 updates an epoch, so views change
    loop.run(config(tmp_path / "stopped", stop_after=7), model)
    loop.run(config(tmp_path / "stopped"), model, resume=True)
    losses = [{row["update"]: row["loss"] for row in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in row}
              for run in ("straight", "stopped")]
    assert losses[0] == losses[1] and len(losses[0]) == 12
