"""Training from the store: checkpoints, exact resume, and a real 2-process torchrun run (gloo)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mellow.files import read_json, read_jsonl, write_json_atomic
from mellow.settings import ModelConfig
from mellow.store.writer import StoreConfig
from mellow.train import loop

from conftest import TINY_MODEL, logged_losses, train_config

REPO = Path(__file__).resolve().parents[2]


_config = functools.partial(train_config, val_every=4)


def test_train_writes_checkpoints_and_loss_falls(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=30, save_every=10, val_every=10,
                               keep_last=2), ModelConfig(**TINY_MODEL))
    assert result.updates == 30
    losses = logged_losses(run_dir)
    assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    latest = read_json(run_dir / "latest.json")
    assert latest == {"path": "step-000030", "update": 30}
    checkpoint = run_dir / latest["path"]
    for name in ("model.pt", "optimizer.pt", "trainer.json", "rng-rank0.pt"):
        assert (checkpoint / name).is_file()
    trainer = read_json(checkpoint / "trainer.json")
    assert trainer["update"] == 30 and trainer["world_size"] == 1
    assert trainer["config"]["model"]["tiny_hidden"] == 32
    assert trainer["store_fingerprint"]["encoder"] == "mel"
    assert len([p for p in run_dir.glob("step-*")]) <= 3  # keep_last 2, plus best
    assert not list(run_dir.glob(".*tmp"))


def test_resume_after_a_stop_continues_with_the_same_losses_and_weights(mel_store, tiny_dataset, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    model = ModelConfig(**TINY_MODEL)
    loop.run(_config(mel_store, tiny_dataset, straight), model)
    loop.run(_config(mel_store, tiny_dataset, stopped, stop_after=3), model)
    assert read_json(stopped / "latest.json")["update"] == 3
    with open(stopped / "metrics.jsonl", "a") as handle:  # as if killed after logging an unsaved update
        handle.write('{"update": 4, "loss": 123.0}\n')
    loop.run(_config(mel_store, tiny_dataset, stopped), model, resume=True)
    expected, resumed = logged_losses(straight), logged_losses(stopped)
    assert [resumed[u] for u in range(1, 9)] == [expected[u] for u in range(1, 9)]
    assert len(read_jsonl(stopped / "metrics.jsonl")) == len(read_jsonl(straight / "metrics.jsonl"))
    first = torch.load(straight / "step-000008" / "model.pt")
    second = torch.load(stopped / "step-000008" / "model.pt")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_existing_run_without_resume_is_refused(mel_store, tiny_dataset, tmp_path):
    import pytest

    run_dir = tmp_path / "run"
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=2), ModelConfig(**TINY_MODEL))
    with pytest.raises(ValueError, match="--resume"):
        loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=2), ModelConfig(**TINY_MODEL))


@pytest.mark.slow
def test_torchrun_two_processes(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "stages" / "03_train.py"), f"--train.store={mel_store}", f"--train.dataset={tiny_dataset}",
               f"--train.run_dir={run_dir}", "--train.max_updates=6", "--train.batch_size=4",
               "--train.save_every=3", "--train.val_every=3", "--train.log_every=1"]
    command += [f"--model.{key}={value}" for key, value in TINY_MODEL.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    trainer = read_json(run_dir / "step-000006" / "trainer.json")
    assert trainer["world_size"] == 2
    assert (run_dir / "step-000006" / "rng-rank1.pt").is_file()
    assert len(logged_losses(run_dir)) == 6
    assert completed.stdout.count("trained ") == 1  # only rank 0 prints


def test_epoch_order_is_deterministic_covers_each_example_once_and_buckets_lengths():
    from mellow.train.batching import epoch_micro_batches

    lengths = np.array([(index * 37) % 50 for index in range(103)])
    first = epoch_micro_batches(lengths, 4, seed=1, epoch=0, bucket=5).tolist()
    assert first == epoch_micro_batches(lengths, 4, seed=1, epoch=0, bucket=5).tolist()
    assert first != epoch_micro_batches(lengths, 4, seed=1, epoch=1, bucket=5).tolist()
    flat = [index for batch in first for index in batch]
    assert len(flat) == len(set(flat)) == 100 and all(len(batch) == 4 for batch in first)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    unbucketed = epoch_micro_batches(lengths, 4, seed=1, epoch=0, bucket=1).tolist()
    spread_plain = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in unbucketed) / len(first)
    assert spread < spread_plain / 2


def test_resume_refuses_a_store_made_differently(mel_store, tiny_dataset, tmp_path):
    import json
    import shutil

    import pytest

    from mellow.store.writer import StoreMismatchError

    run_dir = tmp_path / "run"
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=4, stop_after=2), ModelConfig(**TINY_MODEL))
    other = tmp_path / "other-store"
    shutil.copytree(mel_store, other)
    meta = read_json(other / "meta.json")
    meta["fingerprint"]["clip_seconds"] = 10.0
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreMismatchError, match="clip_seconds: expected 3.0, found 10.0"):
        loop.run(_config(other, tiny_dataset, run_dir, max_updates=4), ModelConfig(**TINY_MODEL), resume=True)


def test_resume_when_no_metrics_were_logged_before_the_checkpoint(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=4, stop_after=2), ModelConfig(**TINY_MODEL))
    (run_dir / "metrics.jsonl").unlink()  # as if killed after a save but before the first log line
    result = loop.run(_config(mel_store, tiny_dataset, run_dir, max_updates=4), ModelConfig(**TINY_MODEL),
                       resume=True)
    assert result.updates == 4 and [row["update"] for row in read_jsonl(run_dir / "metrics.jsonl")][-1] == 4


def test_training_refuses_a_store_unlike_its_encoder_section(mel_store, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from mellow.cli import app
    from mellow.encode.captions import run as precompute_captions
    from mellow.settings import CaptionsConfig

    base = ["train", "--train.store", str(mel_store), "--train.dataset", str(tiny_dataset), "--train.run_dir",
            str(tmp_path / "run"), "--train.max_updates", "1", "--train.batch_size", "4", "--model.tiny_hidden",
            "32", "--model.tiny_layers", "1", "--model.tiny_heads", "2"]
    result = CliRunner().invoke(app, base + ["--encoder.name", "mel", "--encoder.tokens", "16",
                                             "--encoder.clip_seconds", "3"])
    assert result.exit_code == 2
    assert "tokens: the config expects 16, the store has 4" in result.output
    assert "clip_seconds" not in result.output and "name:" not in result.output  # those match
    assert not (tmp_path / "run").exists()  # refused before any work
    result = CliRunner().invoke(app, base + ["--encoder.name", "mel", "--encoder.tokens", "4"])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "run" / "step-000001" / "trainer.json")["config"]["encoder"]["tokens"] == 4
    captions = precompute_captions(CaptionsConfig(dataset=tiny_dataset, store=StoreConfig(root=tmp_path))).store_path
    result = CliRunner().invoke(app, ["train", "--train.store", str(captions), "--train.dataset", str(tiny_dataset)])
    assert result.exit_code == 2 and "holds caption text embeddings" in result.output


def test_resume_refuses_options_that_change_the_training_and_a_changed_split(mel_store, tiny_dataset, tmp_path):
    import shutil

    import pytest

    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset)
    run_dir = tmp_path / "run"
    model = ModelConfig(**TINY_MODEL)
    loop.run(_config(mel_store, dataset, run_dir, stop_after=2), model)
    with pytest.raises(ValueError, match=r"(?s)model.tiny_layers: expected 1, found 2.*"
                                         r"train.optimizer.lr: expected 0.003, found 0.01"):
        loop.run(_config(mel_store, dataset, run_dir, lr=1e-2), ModelConfig(**{**TINY_MODEL, "tiny_layers": 2}),
                  resume=True)
    (dataset / "train.jsonl").write_text((dataset / "train.jsonl").read_text().replace("Describe", "Explain"))
    with pytest.raises(ValueError, match="train.jsonl changed since .* was saved"):
        loop.run(_config(mel_store, dataset, run_dir), model, resume=True)
    shutil.copy(tiny_dataset / "train.jsonl", dataset / "train.jsonl")
    result = loop.run(_config(mel_store, dataset, run_dir, save_every=3, log_every=2, time_limit=600), model,
                       resume=True)  # cadence and limits may change
    assert result.updates == 8 and result.stop_reason is None


def test_a_log_window_cut_by_a_resume_averages_only_its_own_updates(mel_store, tiny_dataset, tmp_path):
    """Stopped at update 5 with --train.log_every 4, a resumed run's first window holds updates 6-8 only: its
    logged loss and samples/s are over 3 updates, not 4 (which once logged a loss 10x too small)."""
    import pytest

    model = ModelConfig(**TINY_MODEL)
    per_update = logged_losses(loop.run(train_config(mel_store, tiny_dataset, tmp_path / "each"), model).run_dir)
    cut = tmp_path / "cut"
    loop.run(train_config(mel_store, tiny_dataset, cut, log_every=4, stop_after=5), model)
    loop.run(train_config(mel_store, tiny_dataset, cut, log_every=4), model, resume=True)
    logged = logged_losses(cut)
    assert sorted(logged) == [4, 5, 8]
    assert logged[4] == pytest.approx(sum(per_update[u] for u in (1, 2, 3, 4)) / 4, rel=1e-6)
    assert logged[5] == pytest.approx(per_update[5], rel=1e-6)
    assert logged[8] == pytest.approx(sum(per_update[u] for u in (6, 7, 8)) / 3, rel=1e-6)


def test_a_run_resumed_from_a_save_inside_a_log_window_logs_the_same_rows(mel_store, tiny_dataset, tmp_path):
    """Killed after the save at update 6 (inside the log window 5-8), the resumed run's row at 8 still averages
    updates 5-8 exactly as the uninterrupted run's does: each rank saves its partial window with the checkpoint."""
    model = ModelConfig(**TINY_MODEL)
    straight = loop.run(train_config(mel_store, tiny_dataset, tmp_path / "straight", log_every=4, save_every=3,
                                      keep_last=3), model).run_dir
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    write_json_atomic(killed / "latest.json", {"path": "step-000006", "update": 6})  # as if killed after it
    shutil.rmtree(killed / "step-000008")
    rows = [row for row in read_jsonl(killed / "metrics.jsonl") if row["update"] <= 6]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loop.run(train_config(mel_store, tiny_dataset, killed, log_every=4, save_every=3, keep_last=3), model,
              resume=True)
    assert logged_losses(killed) == logged_losses(straight) and sorted(logged_losses(killed)) == [4, 8]


def test_without_a_dataset_training_takes_the_stores_and_says_so(mel_store, tiny_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mellow.cli import app

    from conftest import TINY_ARGS

    monkeypatch.chdir(tmp_path)  # no datasets/synth here: the store's own dataset is the one to read
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", f"--train.store={mel_store}", f"--train.run_dir={run_dir}",
                                      "--train.max_updates=2", "--train.batch_size=4", "--train.val_every=0",
                                      "--train.data_workers=0", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert f"dataset {tiny_dataset} (from the store's meta.json" in " ".join(result.output.split())
    assert read_json(run_dir / "step-000002" / "trainer.json")["config"]["train"]["dataset"] == str(tiny_dataset)


def test_eval_takes_the_stores_dataset_when_the_trained_one_is_gone(mel_store, tiny_dataset, tmp_path, capsys):
    from mellow.evaluate import score
    from mellow.settings import EvalConfig

    copy = tmp_path / "moved"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    run_dir = tmp_path / "run"
    loop.run(_config(mel_store, copy, run_dir, max_updates=2, val_every=0), ModelConfig(**TINY_MODEL))
    shutil.rmtree(copy)  # the dataset folder it was trained with is not on this machine
    capsys.readouterr()
    # what 04_eval scores a checkpoint on (evaluate.run: the same, then generation and scoring)
    store, dataset = score.inputs_of(run_dir / "step-000002", EvalConfig(run=run_dir, which="latest"))
    assert (store.path, dataset) == (mel_store, tiny_dataset)
    assert f"dataset {tiny_dataset} (from the store's meta.json" in " ".join(capsys.readouterr().out.split())
