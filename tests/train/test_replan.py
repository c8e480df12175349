"""A finished (or stopped) run continued with another length: `--resume --train.max_updates M` or
`--train.epochs E`. The learning rate follows the documented rule of each schedule (tested against the formulas),
the data order goes on, the optimizer state is kept, the re-plan is recorded, an interrupted extension resumes
bitwise, and a length before the current update is refused in one line that says what to do."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mellow.cli import app
from mellow.evaluate.run_report import write_run_report
from mellow.files import read_json, read_jsonl
from mellow.settings import ModelConfig
from mellow.train import loop
from mellow.train.schedule import Replan, Schedule

from conftest import TINY_ARGS, TINY_MODEL, invoke_ok, latest_weights, logged_losses, train_config


def _cosine(update: int, warmup: int, end: int, cooldown: int, low: float) -> float:
    """The cosine plan, written out as docs/stages.md states it."""
    if update < warmup:
        return (update + 1) / warmup
    if update >= end - cooldown:
        return low * max(0.0, (end - update) / max(1, cooldown))
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (end - cooldown - warmup)))


def test_the_first_plans_follow_their_formulas():
    cosine = Schedule("cosine", 10, 20, 0.1, 200)
    assert all(cosine(u) == pytest.approx(_cosine(u, 10, 200, 20, 0.1)) for u in range(200))
    wsd = Schedule("wsd", 10, 40, 0.1, 200)
    for update in range(200):
        expected = (update + 1) / 10 if update < 10 else 1.0 if update < 160 else 0.1 + 0.9 * (200 - update) / 40
        assert wsd(update) == pytest.approx(expected)


def test_a_cosine_run_continues_from_its_rate_along_a_new_cosine_to_the_same_final_rate():
    first = Schedule("cosine", 10, 0, 0.1, 100)
    at, rate = 60, first(59)  # the rate of the last update trained
    longer = first.replanned(at, 250)
    assert longer.replans == (Replan(60, 100, 250, "cosine"),) and longer.planned == 250
    assert all(longer(u) == first(u) for u in range(at))  # what was trained is unchanged
    for update in range(at, 250):
        expected = 0.1 + (rate - 0.1) * 0.5 * (1 + math.cos(math.pi * (update - at) / (250 - at)))
        assert longer(update) == pytest.approx(expected)
    assert longer(249) == pytest.approx(0.1, abs=1e-3)
    # a run extended before its warmup ended gets the plan as if the new length had been given at the start
    early = first.replanned(5, 300)
    assert early.replans[0].rule == "warmup" and all(early(u) == pytest.approx(_cosine(u, 10, 300, 0, 0.1))
                                                     for u in range(300))


def test_a_wsd_run_keeps_its_stable_rate_or_rewarms_after_its_decay_began():
    first = Schedule("wsd", 10, 30, 0.0, 100)
    stable = first.replanned(50, 150)  # still stable at 50: the decay moves to 120-150
    assert stable.replans[0].rule == "wsd"
    assert [stable(u) for u in (50, 119)] == [1.0, 1.0]
    assert stable(130) == pytest.approx((150 - 130) / 30)
    decaying = first.replanned(85, 200)  # the decay began at 70: rate 0.5 at update 84
    rate = first(84)
    assert decaying.replans[0].rule == "wsd-rewarm" and rate == pytest.approx(16 / 30)
    for update in range(85, 200):
        if update < 95:
            expected = rate + (1 - rate) * (update - 85) / 10  # the re-warm over warmup_updates
        elif update < 170:
            expected = 1.0
        else:
            expected = (200 - update) / 30
        assert decaying(update) == pytest.approx(expected), update
    # a chain: the second re-plan starts from the rate the first gave
    again = decaying.replanned(180, 260)
    assert all(again(u) == decaying(u) for u in range(180))
    assert again(180) == pytest.approx(decaying(179)) and again.replans[1].before == 200


def _lrs(run_dir: Path) -> dict[int, float]:
    return {row["update"]: row["lr"] for row in read_jsonl(run_dir / "metrics.jsonl") if "lr" in row}


def test_resume_with_more_updates_extends_the_run_and_an_interrupted_extension_resumes_bitwise(
        mel_store, tiny_dataset, tmp_path):
    model = ModelConfig(**TINY_MODEL)
    base = dict(warmup_updates=2, save_every=4)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run_dir in (straight, stopped):
        loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=8, **base), model)
    loop.run(train_config(mel_store, tiny_dataset, straight, max_updates=14, **base), model, resume=True)
    loop.run(train_config(mel_store, tiny_dataset, stopped, max_updates=14, stop_after=3, **base), model, resume=True)
    # the plain resume of the stopped extension: config.yaml already says 14
    assert "max_updates: 14" in (stopped / "config.yaml").read_text()
    loop.run(train_config(mel_store, tiny_dataset, stopped, max_updates=14, **base), model, resume=True)
    assert logged_losses(stopped) == logged_losses(straight) and len(logged_losses(straight)) == 14
    first, second = latest_weights(straight), latest_weights(stopped)
    assert all(torch.equal(first[key], second[key]) for key in first)
    replans = read_json(straight / "replans.json")
    assert [{k: r[k] for k in ("at", "before", "after", "rule", "checkpoint")} for r in replans] == [
        {"at": 8, "before": 8, "after": 14, "rule": "cosine", "checkpoint": "step-000008"}]
    assert len(read_json(stopped / "replans.json")) == 1  # resuming the same re-plan records nothing new
    # the learning rate of every update, against the formula: the first plan to 8, then the new cosine
    lrs, peak = _lrs(straight), 3e-3
    rate8 = _cosine(7, 2, 8, 0, 0.1)  # the rate update 8 (the last of the first plan) trained with
    assert set(lrs) == set(range(1, 15))
    # the rate logged at update u is what the next update uses (0-based: update u); after the last update of a
    # plan (8 of the first, 14 of the second) it is never used
    assert lrs[8] == 0.0
    for update in [*range(1, 8), *range(9, 14)]:
        expected = _cosine(update, 2, 8, 0, 0.1) if update < 8 else \
            0.1 + (rate8 - 0.1) * 0.5 * (1 + math.cos(math.pi * (update - 8) / 6))
        assert lrs[update] == pytest.approx(peak * expected), update
    trainer = read_json(straight / "step-000014" / "trainer.json")
    assert trainer["schedule"]["replans"] == [{"at": 8, "before": 8, "after": 14, "rule": "cosine"}]
    # --print-config and the run's report say so, and the loss plot marks it
    shown = invoke_ok("train", "--train.run_dir", str(straight), "--resume", "--print-config").output
    assert "max_updates: 14" in shown and "# re-planned (replans.json):" in shown
    assert "at update 8 (step-000008): 8 -> 14 updates; a new cosine from the current rate" in shown
    report = write_run_report(straight, "val", {}, {}).read_text()
    assert "- at update 8 (step-000008): 8 -> 14 updates, learning rate re-planned by the `cosine` rule" in report
    assert (straight / "eval-val" / "loss.png").stat().st_size > 0


def test_a_length_before_the_current_update_is_refused_in_one_line(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=8), ModelConfig(**TINY_MODEL))
    with pytest.raises(ValueError, match=r"--train.max_updates 6 ends at or before update 8, where step-000008 "
                                         r"stands.*--resume-from step-N"):
        loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=6), ModelConfig(**TINY_MODEL),
                 resume=True)
    changed = r"(?s)train.optimizer.lr: expected 0.003, found 0.001.*--init-from .*step-000008"
    with pytest.raises(ValueError, match=changed):
        loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=12, lr=1e-3), ModelConfig(**TINY_MODEL),
                 resume=True)


def test_epochs_give_the_length_and_extend_it(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    first = invoke_ok("train", f"--train.store={mel_store}", f"--train.dataset={tiny_dataset}",
                      f"--train.run_dir={run_dir}", "--train.epochs=0.5", "--train.batch_size=4",
                      "--train.val_every=0", "--train.save_every=0", *TINY_ARGS).output
    examples = sum(1 for _ in open(tiny_dataset / "train.jsonl"))
    per_epoch = examples // 4  # batch 4: the micro-batches of an epoch (every example's audio is in the store)
    updates = math.ceil(0.5 * per_epoch)
    assert read_json(run_dir / "latest.json")["update"] == updates
    assert f"{updates} updates ({updates / per_epoch:.2f} epochs)" in first
    longer = invoke_ok("train", "--resume", f"--train.run_dir={run_dir}", "--train.epochs=1").output
    assert f"re-planned: {updates} -> {per_epoch} updates" in longer and "(1.00 epochs)" in longer
    assert read_json(run_dir / "latest.json")["update"] == per_epoch
    assert read_json(run_dir / "replans.json")[0]["after"] == per_epoch
    # a run whose length is in epochs refuses a max_updates that would be ignored
    refused = CliRunner().invoke(app, ["train", "--resume", f"--train.run_dir={run_dir}", "--train.epochs=1",
                                       "--train.max_updates=99"])
    assert refused.exit_code == 2 and "--train.max_updates 99 and --train.epochs 1 both give the run's length" in \
        " ".join(refused.output.split()), refused.output


def test_an_extension_from_an_earlier_checkpoint_moves_later_replans_to_its_branch(mel_store, tiny_dataset,
                                                                                   tmp_path):
    run_dir, model = tmp_path / "run", ModelConfig(**TINY_MODEL)
    kept = dict(save_every=4, keep_last=5)
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=8, **kept), model)
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=12, **kept), model, resume=True)
    loop.run(train_config(mel_store, tiny_dataset, run_dir, max_updates=16, resume_from="step-4", **kept), model,
             resume=True)
    assert [(r["at"], r["before"], r["after"]) for r in read_json(run_dir / "replans.json")] == [(4, 8, 16)]
    [branch] = (run_dir / "branches").iterdir()
    assert [(r["at"], r["after"]) for r in read_json(branch / "replans.json")] == [(8, 12), (4, 16)]
    assert read_json(run_dir / "latest.json")["update"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_during_an_extension_then_resume_gives_the_weights_of_one_never_killed(mel_store, tiny_dataset,
                                                                                     tmp_path, processes):
    from test_train_resilience import _command, _resume, _run, _start, _wait_for, _workers

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run_dir in (straight, killed):
        _run(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=8", "--train.save_every=4",
                      processes=processes))
    extend = ["--train.max_updates=20", "--train.save_every=4"]
    _run(_resume(straight, *extend, processes=processes))
    process = _start(_resume(killed, *extend, processes=processes))
    _wait_for(killed / "step-000012", process)
    for pid in [*_workers(process.pid).values(), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    saved = read_json(killed / "latest.json")["update"]
    assert 12 <= saved < 20, saved
    _run(_resume(killed, processes=processes))  # config.yaml says 20 now
    assert logged_losses(killed) == logged_losses(straight) and len(logged_losses(straight)) == 20
    first, second = latest_weights(straight), latest_weights(killed)
    assert all(torch.equal(first[key], second[key]) for key in first)
