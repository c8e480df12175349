"""--resume-from: continuing a run from a chosen checkpoint (best, step-N) reproduces the uninterrupted run's
later losses and weights bitwise; the newer checkpoints and metrics are kept in a branch folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mellow.files import read_json, read_jsonl, write_json_atomic
from mellow.settings import ModelConfig
from mellow.train import loop

from conftest import TINY_MODEL, logged_losses, train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def straight_run(mel_store, tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume-from") / "straight"
    loop.run(train_config(mel_store, tiny_dataset, run_dir, save_every=2, keep_last=10), ModelConfig(**TINY_MODEL))
    return run_dir


def test_resume_from_an_earlier_step_branches_and_reproduces_the_later_losses_bitwise(straight_run, tmp_path):
    run_dir = tmp_path / "branched"
    shutil.copytree(straight_run, run_dir)
    completed = subprocess.run([sys.executable, str(REPO / "stages" / "03_train.py"), "--resume-from", "step-4",
                                "--train.run_dir", str(run_dir)], capture_output=True, text=True, timeout=600,
                               cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "continuing from step-000004, an earlier checkpoint" in completed.stdout
    expected, resumed = logged_losses(straight_run), logged_losses(run_dir)
    assert [resumed[u] for u in range(1, 9)] == [expected[u] for u in range(1, 9)]  # bitwise, updates 5-8 redone
    for step in ("step-000006", "step-000008"):
        first, second = (torch.load(run / step / "model.pt") for run in (straight_run, run_dir))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    [branch] = read_json(run_dir / "branches.json")
    assert branch["from"] == "step-000004" and branch["update"] == 4 and branch["previous_latest"] == "step-000008"
    assert branch["moved"] == ["step-000006", "step-000008"]
    kept = run_dir / branch["kept_in"]
    assert sorted(p.name for p in kept.glob("step-*")) == ["step-000006", "step-000008"]  # the old branch kept
    assert read_jsonl(kept / "metrics.jsonl") == read_jsonl(straight_run / "metrics.jsonl")
    assert read_json(run_dir / "latest.json")["path"] == "step-000008"


def test_resume_from_best_and_bad_choices(straight_run, mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "best"
    shutil.copytree(straight_run, run_dir)
    write_json_atomic(run_dir / "best.json", {"path": "step-000006", "update": 6, "metric": "val_loss",
                                              "value": 0.5})
    model = ModelConfig(**TINY_MODEL)
    config = train_config(mel_store, tiny_dataset, run_dir, save_every=2, keep_last=10, resume_from="best")
    loop.run(config, model, resume=True)
    assert read_json(run_dir / "branches.json")[0]["from"] == "step-000006"
    assert logged_losses(run_dir) == logged_losses(straight_run)
    for choice, message in (("step-5", "not a complete checkpoint; the run has step-000002"),
                            ("soon", "must be latest, best or step-N")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            loop.run(train_config(mel_store, tiny_dataset, run_dir, save_every=2, keep_last=10,
                                   resume_from=choice), model, resume=True)
    with pytest.raises(ValueError, match="pass --resume too"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "new", resume_from="step-2"), model)
