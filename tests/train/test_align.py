"""02_align: contrastive warm start of the audio projector from the audio and caption stores, its retrieval
scores (checked by hand on constructed cases), and 03_train --train.align_from."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mellow import settings
from mellow.cli import app
from mellow.encode import captions
from mellow.files import read_json, read_jsonl
from mellow.settings import AlignConfig, ModelConfig
from mellow.store.writer import StoreConfig, StoreMismatchError
from mellow.train import align, loop
from mellow.train.align import SplitData, retrieval_scores

from conftest import TINY_MODEL, train_config


@pytest.fixture(scope="module")
def captions_store(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    config = settings.CaptionsConfig(dataset=tiny_dataset, store=StoreConfig(root=root, shard_clips=16))
    return captions.run(config).store_path


@pytest.fixture(scope="module")
def aligned(mel_store, captions_store, tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("align") / "run"
    result = CliRunner().invoke(app, ["align", "--store", str(mel_store), "--captions", str(captions_store),
                                      "--dataset", str(tiny_dataset), "--run-dir", str(run_dir), "--tiny-hidden", "32",
                                      "--updates", "150", "--batch-size", "8", "--lr", "3e-3", "--val-every", "50",
                                      "--projector-dropout", "0"])
    assert result.exit_code == 0, result.output
    assert "aligned" in result.output and "audio to text: R@1" in result.output
    return run_dir


class Identity(torch.nn.Module):
    def embed_audio(self, audio, valid):
        return audio[:, 0]


def test_retrieval_scores_on_hand_checked_cases():
    """3 clips; clip 0 has 2 captions. Audio embeddings = first token; captions placed by hand."""
    audio = torch.eye(3)[:, None, :]  # clip i points along axis i
    captions = [torch.tensor([[1.0, 0, 0], [-0.1, 0.6, 0.79]]),  # clip 0: one caption right, one nearer clip 2
                torch.tensor([[0, 1.0, 0]]), torch.tensor([[0.1, 0, 0.99]])]
    scores = retrieval_scores(Identity(), SplitData(audio, torch.ones(3, dtype=torch.long), captions, ["a", "b", "c"]),
                              torch.device("cpu"))
    # text -> audio: caption (-.1,.6,.79) ranks clip 2 first, clip 0 last (rank 3); the others are right at rank 1
    assert scores["text_to_audio_R@1"] == pytest.approx(3 / 4)
    assert scores["text_to_audio_mAP@10"] == pytest.approx((1 + 1 / 3 + 1 + 1) / 4)
    # audio -> text: clip 0 ranks its captions 1st (1.0) and 4th (-0.1, after 0.1 and 0) -> AP (1 + 2/4) / 2;
    # clip 1 ranks its one caption first (1.0 > 0.6), clip 2 too (0.99 > 0.79) -> AP 1
    assert scores["audio_to_text_R@1"] == pytest.approx(1.0)
    assert scores["audio_to_text_mAP@10"] == pytest.approx(((1 + 2 / 4) / 2 + 1 + 1) / 3)
    assert scores["text_to_audio_R@1_chance"] == pytest.approx(1 / 3) and scores["captions"] == 4


def test_alignment_learns_and_writes_a_self_describing_run(aligned, mel_store, captions_store, tiny_dataset):
    result = read_json(aligned / "align.json")
    assert result["last_loss"] < 0.5 * result["first_loss"]
    history = read_jsonl(aligned / "metrics.jsonl")
    assert len(history) == 150 and [row["update"] for row in history if "val" in row] == [50, 100, 150]
    assert result["audio_fingerprint"]["encoder"] == "mel" and result["width"] == 32
    test = read_json(aligned / "retrieval-test.json")
    assert set(test) >= {"audio_to_text_R@1", "audio_to_text_R@5", "audio_to_text_R@10", "audio_to_text_mAP@10",
                         "text_to_audio_R@1", "text_to_audio_R@5", "text_to_audio_R@10", "text_to_audio_mAP@10"}
    assert all(0 <= value <= 1 for key, value in test.items() if "@" in key)
    # on the clips it trained on, it retrieves far above chance (the test split is too small to say much)
    model = align.AlignmentModel(mel_store_dim(mel_store), 32, 384, 0.0, 0.07)
    state = torch.load(aligned / "align.pt", weights_only=True)
    model.audio_projector.load_state_dict(state["audio_projector"])
    model.head.load_state_dict(state["head"])
    train_split = align.AlignmentData(*stores(mel_store, captions_store)).split(tiny_dataset, "train")
    scores = retrieval_scores(model, train_split, torch.device("cpu"))
    assert scores["text_to_audio_R@1"] > 4 * scores["text_to_audio_R@1_chance"]


def mel_store_dim(store_path) -> int:
    from mellow.store.reader import EmbeddingStore

    return EmbeddingStore(store_path).dim


def stores(mel_store, captions_store):
    from mellow.store.reader import EmbeddingStore

    return EmbeddingStore(mel_store), EmbeddingStore(captions_store)


def test_a_finished_alignment_is_skipped_and_another_config_is_refused(aligned, mel_store, captions_store,
                                                                       tiny_dataset):
    config = read_json(aligned / "align.json")["config"]
    same = AlignConfig(store=mel_store, captions=captions_store, dataset=tiny_dataset, run_dir=aligned,
                       **{k: v for k, v in config.items() if k not in ("store", "captions", "dataset")})
    before = (aligned / "align.pt").stat().st_mtime_ns
    align.run(same)
    assert (aligned / "align.pt").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another config:\n  updates: expected 150, found 10"):
        align.run(AlignConfig(**{**vars(same), "updates": 10}))
    result = CliRunner().invoke(app, ["align", "--store", str(captions_store), "--captions", str(mel_store)])
    assert result.exit_code == 2 and "--store must be an audio store" in result.output
    result = CliRunner().invoke(app, ["align", "--captions", str(captions_store)])
    assert result.exit_code == 2 and "02_align needs the audio store that 01_precompute wrote" in result.output
    assert "e.g. uv run stages/01_precompute_captions.py" in result.output


def test_train_starts_from_the_aligned_projector(aligned, mel_store, tiny_dataset, tmp_path):
    from mellow.model.modeling import build_model
    from mellow.train.checkpoint import load_aligned_projector

    model, _ = build_model(ModelConfig(**TINY_MODEL), mel_store_dim(mel_store), seed=0)
    load_aligned_projector(aligned, model.audio_projector, stores(mel_store, mel_store)[0])
    saved = torch.load(aligned / "align.pt", weights_only=True)["audio_projector"]
    assert all(torch.equal(model.audio_projector.state_dict()[k], saved[k]) for k in saved)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", f"--train.store={mel_store}", f"--train.dataset={tiny_dataset}",
                                      f"--train.run_dir={run_dir}", "--train.max_updates=2", "--train.batch_size=4",
                                      "--train.val_every=0", "--model.tiny_hidden=32", "--model.tiny_layers=1",
                                      "--model.tiny_heads=2", "--align-from", str(aligned)])
    assert result.exit_code == 0, result.output
    assert "audio projector warm-started from" in result.output
    assert yaml_config(run_dir)["train"]["align_from"] == str(aligned)
    wide = ModelConfig(**{**TINY_MODEL, "tiny_hidden": 64})
    with pytest.raises(StoreMismatchError, match="width 32; this run's decoder is 64 wide"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "wide", max_updates=2, align_from=aligned), wide)
    with pytest.raises(ValueError, match="drop --train.align_from"):
        train_config(mel_store, tiny_dataset, tmp_path / "both", align_from=aligned, init_from=run_dir)
    with pytest.raises(ValueError, match="no align.json"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "none", align_from=tmp_path),
                  ModelConfig(**TINY_MODEL))


def yaml_config(run_dir) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())
