"""The YAML presets under stages/configs/: each loads and validates, the quickstart's training run is its preset
(the only place it is written), and the SmolLM2 LoRA preset runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mellow import quickstart
from mellow.cli import app
from mellow.config import load, yaml_layer
from mellow.settings import QuickstartConfig, TrainJob
from mellow.train import loop

PRESETS = sorted((Path(__file__).resolve().parents[1] / "stages" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_validates(preset):
    job = load(TrainJob, [yaml_layer(preset)])
    train, model = job.train, job.model
    assert train.max_updates > 0 and train.store.name and model.decoder
    result = CliRunner().invoke(app, ["train", "--config", str(preset), "--print-config"])
    assert result.exit_code == 0 and f"decoder: {model.decoder}" in result.output


def test_the_quickstart_trains_its_preset(tmp_path):
    assert quickstart.PRESET == PRESETS[[p.stem for p in PRESETS].index("quickstart")]
    written = yaml.safe_load(quickstart.PRESET.read_text())
    job = quickstart.training_job(QuickstartConfig(updates=800), tmp_path / "store", tmp_path / "data",
                                  tmp_path / "run")
    assert (job.train.store, job.train.dataset, job.train.run_dir) == (tmp_path / "store", tmp_path / "data",
                                                                       tmp_path / "run")
    assert job.train.max_updates == 800 and job.train.checkpoint.val_every == job.train.checkpoint.save_every == 200
    assert job.train.optimizer.lr == written["train"]["lr"] and job.train.precision == written["train"]["precision"]
    assert job.train.data.batch_size == written["train"]["batch_size"]
    data = written["train"]
    assert (job.train.data.batch_tokens, job.train.data.packing, job.train.data.pack_length) == (
        data["batch_tokens"], data["packing"], data["pack_length"])
    assert {key: getattr(job.model, key) for key in written["model"]} == written["model"]
    assert job.encoder.tokens == written["encoder"]["tokens"] and job.encoder.name == "whisper-tiny"
    assert job.model.missing_audio == "marker"


def test_the_quickstart_keeps_the_layout_of_a_run_an_earlier_mellow_made(tmp_path):
    """Run again over its own earlier run, the quickstart continues it as it was made: a config.yaml that names
    no missing_audio (written before the setting existed) is the padded block layout, not a change to refuse."""
    config = QuickstartConfig(updates=800)
    made = quickstart.training_job(config, tmp_path / "store", tmp_path / "data", tmp_path / "run")
    (tmp_path / "run").mkdir()
    saved = loop.resolved_config(made.train, made.model)
    del saved["model"]["missing_audio"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    again = quickstart.training_job(config, tmp_path / "store", tmp_path / "data", tmp_path / "run")
    assert again.model.missing_audio == "block" and again.train == made.train
    loop.check_resumable_config(saved, loop.resolved_config(again.train, again.model), tmp_path / "run")


@pytest.mark.slow  # SmolLM2-135M itself on a CPU (~55 s); tests/test_train_toolbox.py trains LoRA on a tiny decoder
def test_smollm2_lora_preset_trains(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    preset = PRESETS[[p.stem for p in PRESETS].index("smollm2-lora")]
    result = CliRunner().invoke(app, [
        "train", "--config", str(preset), f"--train.store={mel_store}", f"--train.dataset={tiny_dataset}",
        f"--train.run_dir={run_dir}", "--train.max_updates=2", "--train.batch_size=4", "--train.warmup_updates=1",
        "--train.cooldown_updates=0", "--train.val_every=2", "--train.val_examples=8", "--encoder.name=mel"])
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output
    saved = torch.load(run_dir / "step-000002" / "model.pt")
    decoder = [key for key in saved if key.startswith("language_model.")]
    assert len(decoder) == 30 * 4 * 2  # 30 layers x (q, k, v, o) x (A, B)
