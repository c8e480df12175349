"""No position for a missing audio: a single-audio example carries one learned marker, rows hold only valid audio
tokens, and the numbers of a two-audio example are those of the padded block layout; a model saved before
--model.missing_audio existed is rebuilt, resumed and exported in the block layout it was trained in."""

from __future__ import annotations

import pytest
import torch
import yaml

from mellow.config import Layer, load
from mellow.evaluate.export import export, load_exported_model
from mellow.files import read_json, write_json_atomic
from mellow.model.modeling import build_model
from mellow.settings import ExportConfig, ModelConfig, TrainJob, saved_settings
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.checkpoint import load_trained_model
from mellow.train.data import ExampleSet, load_examples
from mellow.train.runs import train_settings

from conftest import TINY_MODEL, train_config


@pytest.fixture(scope="module")
def examples_and_model(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    model, tokenizer = build_model(ModelConfig(**TINY_MODEL, projector_dropout=0.0), store.dim, seed=0)
    return ExampleSet(load_examples(tiny_dataset, "train"), store, tokenizer, max_text_tokens=96), model.eval()


def _likelihoods(model, batch, layout: str) -> torch.Tensor:
    model.missing_audio = layout
    try:
        return model.answer_log_likelihood(batch)
    finally:
        model.missing_audio = "marker"


def test_two_audio_examples_compute_the_same_in_both_layouts_on_fewer_positions(examples_and_model):
    examples, model = examples_and_model
    pairs = [i for i in range(len(examples)) if examples.tokenized.row2[i] >= 0]
    valid1, valid2 = examples.valid_tokens()
    short_clip = [i for i in pairs if min(valid1[i], valid2[i]) < 4]  # a clip shorter than the store's 4 tokens
    assert short_clip
    chosen = short_clip[:3] + [i for i in pairs if i not in short_clip][:3]
    batch = examples.batch(chosen)
    torch.testing.assert_close(_likelihoods(model, batch, "marker"), _likelihoods(model, batch, "block"),
                               rtol=1e-5, atol=1e-5)
    short = examples.batch(short_clip)  # every row shorter than the block layout's padded slots
    assert model.positions_of(short)[0] < len(short_clip) * (2 + 2 * 4 + short["input_ids"].shape[1])


def test_a_single_audio_example_carries_one_marker_token(examples_and_model):
    examples, model = examples_and_model
    index = next(i for i in range(len(examples)) if examples.tokenized.row2[i] < 0)
    batch = examples.batch([index])
    embeds, mask, positions, text_at = model.build_inputs(batch)
    valid1, text = int(batch["audio1_valid"][0]), batch["input_ids"].shape[1]
    assert embeds.shape[1] == valid1 + 1 + 1 + 1 + text  # audio1, separator, marker, separator, text
    marker = embeds[0, valid1 + 1]
    assert torch.equal(marker, model.no_audio_embedding.detach())
    assert int((embeds[0] == model.no_audio_embedding.detach()).all(dim=1).sum()) == 1
    assert text_at[0].tolist() == list(range(valid1 + 3, valid1 + 3 + text)) and mask.all()
    block = _likelihoods(model, batch, "block")
    assert not torch.allclose(block, _likelihoods(model, batch, "marker"), atol=1e-4)  # T tokens vs one


def test_a_run_saved_before_the_setting_loads_resumes_and_exports_as_block(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=4, save_every=2, stop_after=2),
             ModelConfig(**TINY_MODEL, missing_audio="block"))
    for path in [run_dir / "config.yaml"]:  # as the code before the setting wrote them
        config = yaml.safe_load(path.read_text())
        del config["model"]["missing_audio"]
        path.write_text(yaml.safe_dump(config))
    trainer = read_json(run_dir / "step-000002" / "trainer.json")
    del trainer["config"]["model"]["missing_audio"]
    write_json_atomic(run_dir / "step-000002" / "trainer.json", trainer)

    model, _, _ = load_trained_model(run_dir / "step-000002", torch.device("cpu"))
    assert model.missing_audio == "block"
    out = export(ExportConfig(checkpoint=run_dir / "step-000002", out=tmp_path / "exported"))
    assert load_exported_model(out, torch.device("cpu"))[0].missing_audio == "block"
    assert saved_settings(trainer["config"])["model.missing_audio"] == "block"
    job = train_settings(Layer({"train.run_dir": str(run_dir)}, {"train.run_dir": "--train.run_dir"}), None,
                         resume=True)
    assert job.model.missing_audio == "block"
    loop.run(job.train, job.model, resume=True)  # the saved run's own layout: no change to refuse
    assert read_json(run_dir / "step-000004" / "trainer.json")["config"]["model"]["missing_audio"] == "block"
    fresh = load(TrainJob, [])
    assert fresh.model.missing_audio == "marker"  # new runs get the marker
