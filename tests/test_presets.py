"""The YAML presets under stages/configs/: each loads and validates, the quickstart preset is the quickstart's
own training config, and the SmolLM2 LoRA preset runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mellow.cli import app, load_train_configs
from mellow.config import to_dict
from mellow.quickstart import training_configs

PRESETS = sorted((Path(__file__).resolve().parents[1] / "stages" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_validates(preset):
    train, model, expected = load_train_configs(preset, [])
    assert train.max_updates > 0 and train.store.name and model.decoder
    result = CliRunner().invoke(app, ["train", "--config", str(preset), "--print-config"])
    assert result.exit_code == 0 and f"decoder: {model.decoder}" in result.output


def test_quickstart_preset_is_the_quickstarts_training_run():
    preset = load_train_configs(PRESETS[[p.stem for p in PRESETS].index("quickstart")], [])
    train, model, expected = training_configs(preset[0].store, preset[0].dataset, preset[0].run_dir,
                                              "whisper-tiny", 1600)
    assert to_dict(preset[0]) == to_dict(train) and preset[1] == model and preset[2] == expected


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
