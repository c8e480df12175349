"""Where training metrics go: metrics.jsonl, TensorBoard event files (read back with tensorboard's own
reader), and an offline W&B run; each shows every update once after a resume that dropped logged updates."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from mellow.files import read_jsonl, write_json_atomic
from mellow.settings import ModelConfig
from mellow.train import loop

from conftest import TINY_MODEL, train_config

_config = functools.partial(train_config, max_updates=6, lr=1e-3, val_every=3, save_every=3, keep_last=5)


def _killed_after_logging_update_5_then_resumed(store: Path, dataset: Path, run_dir: Path, **overrides) -> None:
    """Update 5 is logged, but the run 'dies' before its checkpoint: latest points to update 3 again."""
    model = ModelConfig(**TINY_MODEL)
    loop.run(_config(store, dataset, run_dir, stop_after=5, **overrides), model)
    shutil.rmtree(run_dir / "step-000005")
    write_json_atomic(run_dir / "latest.json", {"path": "step-000003", "update": 3})
    loop.run(_config(store, dataset, run_dir, **overrides), model, resume=True)


def test_jsonl_and_tensorboard_hold_every_update_once_after_a_resume(mel_store, tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _killed_after_logging_update_5_then_resumed(mel_store, tiny_dataset, run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    losses = {row["update"]: row["loss"] for row in rows if "loss" in row}
    assert [row["update"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert all(row["peak_memory_mb"] > 10 for row in rows if "loss" in row)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [event.step for event in scalars] == [1, 2, 3, 4, 5, 6]  # the first run's update 4 and 5 purged
    assert all(event.value == pytest.approx(losses[event.step], rel=1e-6) for event in scalars)
    assert [event.step for event in events.Scalars("val_loss")] == [3, 6]
    assert {"lr", "grad_norm", "samples_per_s", "peak_memory_mb"} <= set(events.Tags()["scalars"])


def test_an_offline_wandb_run_gets_every_update_and_is_resumed(mel_store, tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    _killed_after_logging_update_5_then_resumed(mel_store, tiny_dataset, run_dir, tensorboard=False)
    run_id = (run_dir / "wandb-id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)  # one W&B run, resumed
    logged = b"".join(path.read_bytes() for path in (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        for key in ("loss", "val_loss"):
            if key in row:
                assert json.dumps(row[key]).encode() in logged, (row["update"], key)
    assert not (run_dir / "tensorboard").exists()


def test_wandb_on_without_the_package_is_a_clear_error(mel_store, tiny_dataset, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the wandb package"):
        loop.run(_config(mel_store, tiny_dataset, tmp_path / "run", wandb="on"), ModelConfig(**TINY_MODEL))


KEY = "k" * 40


@pytest.mark.parametrize("environment, auto, on", [
    ({}, None, "offline"),  # nothing asks for W&B: none, though the package is installed
    ({"WANDB_MODE": "offline"}, "offline", "offline"),
    ({"WANDB_MODE": "disabled", "WANDB_API_KEY": KEY}, None, "disabled"),
    ({"WANDB_API_KEY": KEY}, "online", "online"),
    ({"netrc": f"machine api.wandb.ai\n  login user\n  password {KEY}\n"}, "online", "online"),
    ({"netrc": "machine example.com\n  login user\n  password secret\n"}, None, "offline"),
])
def test_wandb_runs_only_when_asked_for(environment, auto, on, tmp_path, monkeypatch):
    from mellow.train.tracking import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc unless the case writes one
    for key, value in environment.items():
        if key == "netrc":
            (tmp_path / ".netrc").write_text(value)
            (tmp_path / ".netrc").chmod(0o600)
        else:
            monkeypatch.setenv(key, value)
    assert (wandb_mode("auto"), wandb_mode("on"), wandb_mode("off")) == (auto, on, None)


def test_a_default_run_writes_nothing_for_wandb(mel_store, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=2, val_every=0), ModelConfig(**TINY_MODEL))
    assert (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb-id").exists()


def test_a_run_restarted_before_its_first_checkpoint_logs_each_update_once(mel_store, tiny_dataset, tmp_path):
    """A run killed before it saved anything left metrics behind; --resume starts it again from update 0, and
    metrics.jsonl and TensorBoard show each update once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    model = ModelConfig(**TINY_MODEL)
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=4, val_every=0, save_every=0), model)
    for checkpoint in run_dir.glob("step-*"):
        shutil.rmtree(checkpoint)
    for pointer in ("latest.json", "best.json"):
        (run_dir / pointer).unlink(missing_ok=True)
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=4, val_every=0, save_every=0), model,
              resume=True)
    assert [row["update"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row] == [1, 2, 3, 4]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
