"""`mellow export`: a self-contained model folder that `mellow ask --model` runs and plain transformers loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mellow.cli import app
from mellow.config import from_names
from mellow.evaluate import ask, export, score
from mellow.files import read_json, read_jsonl
from mellow.settings import AskConfig, EvalConfig, ExportConfig, ModelConfig, TrainConfig
from mellow.train import loop
from mellow.train.checkpoint import load_trained_model
from mellow.train.runs import find_checkpoint

from conftest import TINY_MODEL, save_tiny_llama


def _logits(language_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return language_model(input_ids=ids).logits


@pytest.fixture(scope="module")
def chat_run(mel_store, tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=30,
                        batch_size=8,
                          lr=1e-2, warmup_updates=2, val_every=0, save_every=30),
              ModelConfig(**TINY_MODEL, prompt_format="chat"))
    score.run(EvalConfig(run=run_dir, max_new_tokens=8, similarity=False))
    return run_dir


def test_exported_model_answers_as_the_checkpoint_and_its_decoder_loads_with_transformers(chat_run, tiny_dataset,
                                                                                           tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(chat_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"decoder", "projector.safetensors", "encoder.json", "mellow.json",
                                               "README.md"}
    checkpoint = find_checkpoint(chat_run)
    model, _, trainer = load_trained_model(checkpoint, torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(out / "decoder")
    ids = torch.randint(0, 1000, (2, 7))
    torch.testing.assert_close(_logits(plain, ids), _logits(model.language_model, ids), rtol=0, atol=0)
    assert set(load_file(out / "projector.safetensors")) == {
        name for name in model.state_dict() if not name.startswith("language_model.")}
    assert read_json(out / "encoder.json") == trainer["store_fingerprint"]
    card = (out / "README.md").read_text()
    scores = read_json(checkpoint / "eval-test" / "scores.json")["scores"]
    assert f"| yes_no | {scores['yes_no']['count']} | accuracy {scores['yes_no']['accuracy']:.3f} |" in card
    assert "prompt format: `chat`" in card
    commands = [line for line in card.splitlines() if "mellow ask" in line]  # run as written, from the project
    assert commands and all(line.startswith("uv run mellow ask --model . ") for line in commands)

    paths = {record["id"]: tiny_dataset / record["path"] for record in read_jsonl(tiny_dataset / "audio.jsonl")}
    predictions = read_jsonl(checkpoint / "eval-test" / "predictions.jsonl")
    for example in (next(p for p in predictions if p["audio2"] is None),
                    next(p for p in predictions if p["audio2"] is not None)):
        files = [paths[example["audio1"]]] + ([paths[example["audio2"]]] if example["audio2"] else [])
        from_export = ask.ask(AskConfig(model=out, max_new_tokens=8), files, example["prompt"])
        assert from_export == ask.ask(AskConfig(checkpoint=chat_run, max_new_tokens=8), files, example["prompt"])
        assert from_export == example["prediction"]


def test_lora_adapters_are_merged_into_the_exported_decoder(mel_store, tiny_dataset, tmp_path):
    decoder_dir = save_tiny_llama(tmp_path / "decoder")
    run_dir = tmp_path / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=4,
                        batch_size=4,
                          lr=5e-2, warmup_updates=1, val_every=0),
              ModelConfig(decoder=f"hf:{decoder_dir}", decoder_mode="lora", lora_dropout=0.0))
    export.export(ExportConfig(checkpoint=run_dir, out=tmp_path / "model"))
    model, _, _ = load_trained_model(find_checkpoint(run_dir), torch.device("cpu"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model" / "decoder")
    base = AutoModelForCausalLM.from_pretrained(decoder_dir)
    ids = torch.randint(0, 1000, (2, 7))
    torch.testing.assert_close(_logits(merged, ids), _logits(model.language_model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-4)  # the adapters did change it
    assert not any("lora" in name for name in merged.state_dict())


def test_export_and_ask_bad_inputs_are_clear_errors(chat_run, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="--out .*taken exists; pass --overwrite"):
        ExportConfig(checkpoint=chat_run, out=tmp_path / "taken")
    with pytest.raises(ValueError, match="give --checkpoint .* or --model .*, one of the two"):
        AskConfig(checkpoint=chat_run, model=tmp_path)
    with pytest.raises(ValueError, match="give --checkpoint .* or --model .*, one of the two"):
        AskConfig()
    with pytest.raises(ValueError, match="no mellow.json; pass a folder written by `mellow export`"):
        export.load_exported_model(tmp_path / "taken", torch.device("cpu"))


def test_model_card_of_a_checkpoint_saved_before_newer_settings_existed():
    info = {"model": {"decoder": "tiny", "decoder_mode": "full"}, "eval": None,
            "source": {"checkpoint": "checkpoints/old/step-001200", "update": 1200, "store": "shards/s",
                       "train": {"max_updates": 1200, "dataset": "datasets/synth", "batch_size": 32, "lr": 1e-3}}}
    card = export.model_card(info, {"encoder": "whisper-tiny", "clip_seconds": 6.0, "tokens": 16, "dim": 384})
    assert "precision fp32, seed 0" in card and "prompt format: `plain`" in card and "Not evaluated" in card
