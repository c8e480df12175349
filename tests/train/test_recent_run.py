"""The commands users type, as they type them: `03_train.py --resume` and `04_eval.py` with no run folder take
the most recent run under checkpoints/ (plain and under torchrun), none or an ambiguous one is one clear line,
and an error under torchrun is printed once and is the last line (mellow/torchrun_hook.py), not a traceback.
Real processes throughout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mellow.cli import app
from mellow.config import from_names
from mellow.files import read_json
from mellow.settings import ModelConfig, TrainConfig
from mellow.train import loop

from conftest import TINY_MODEL, logged_losses

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_runs(mel_store, tiny_dataset, tmp_path_factory) -> Path:
    """checkpoints/older and checkpoints/newer, each stopped after 2 of 4 updates; newer saved 2 hours later."""
    folder = tmp_path_factory.mktemp("project")
    for name in ("older", "newer"):
        loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=folder / "checkpoints" / name,
                              max_updates=4, stop_after=2, batch_size=4, val_every=0, save_every=2),
                  ModelConfig(**TINY_MODEL))
    hours_ago = time.time() - 3 * 3600
    os.utime(folder / "checkpoints" / "older" / "latest.json", (hours_ago, hours_ago))
    os.utime(folder / "checkpoints" / "newer" / "latest.json", (hours_ago + 7200, hours_ago + 7200))
    return folder


def _project(two_runs: Path, tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(two_runs, project, copy_function=shutil.copy2)  # keeps the pointers' times
    return project


def _stage(cwd: Path, *arguments: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    environment = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def test_resume_alone_continues_the_most_recent_run_and_eval_alone_scores_it(two_runs, tmp_path, monkeypatch):
    project = _project(two_runs, tmp_path)
    done = _in_process(project, monkeypatch, "train", "--resume")
    assert done.exit_code == 0, done.output
    assert "resuming the most recent run checkpoints/newer" in done.output
    assert "pass --train.run_dir <run folder> to pick another" in done.output
    assert max(logged_losses(project / "checkpoints" / "newer")) == 4  # continued to the end
    assert read_json(project / "checkpoints" / "older" / "latest.json")["path"] == "step-000002"  # untouched
    scored = _in_process(project, monkeypatch, "eval", "--max-examples", "4", "--max-new-tokens", "2",
                         "--no-similarity")
    assert scored.exit_code == 0, scored.output
    assert "scoring the most recent run checkpoints/newer" in scored.output
    assert (project / "checkpoints" / "newer" / "eval-test" / "report.md").is_file()
    assert not (project / "checkpoints" / "older" / "eval-test").exists()


@pytest.mark.slow
def test_the_stage_scripts_as_typed_resume_and_score_the_most_recent_run(two_runs, tmp_path):
    project = _project(two_runs, tmp_path)
    done = _stage(project, str(ROOT / "stages" / "03_train.py"), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming the most recent run checkpoints/newer" in done.stdout
    assert "pass --train.run_dir <run folder> to pick another" in done.stdout
    assert max(logged_losses(project / "checkpoints" / "newer")) == 4  # continued to the end
    assert read_json(project / "checkpoints" / "older" / "latest.json")["path"] == "step-000002"  # untouched

    scored = _stage(project, str(ROOT / "stages" / "04_eval.py"), "--max-examples", "4", "--max-new-tokens", "2",
                    "--no-similarity")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert "scoring the most recent run checkpoints/newer" in scored.stdout
    assert (project / "checkpoints" / "newer" / "eval-test" / "report.md").is_file()
    assert not (project / "checkpoints" / "older" / "eval-test").exists()


def _in_process(cwd: Path, monkeypatch, *arguments: str):
    """A command run in this process (the messages are the same as a stage script's; faster than a process)."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(arguments))


def test_no_run_or_two_runs_saved_together_is_one_line_naming_the_flag(two_runs, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command, flag in ((["train", "--resume"], "--train.run_dir"), (["eval"], "a run folder")):
        failed = _in_process(empty, monkeypatch, *command)
        assert failed.exit_code == 2 and failed.output.startswith("error: no run found: "), failed.output
        assert flag in failed.output and len(failed.output.strip().splitlines()) == 1

    project = _project(two_runs, tmp_path)
    now = time.time()
    for name in ("older", "newer"):
        os.utime(project / "checkpoints" / name / "latest.json", (now - 20, now - 20))
    failed = _in_process(project, monkeypatch, "train", "--resume")
    assert failed.exit_code == 2 and failed.output.startswith("error: the most recent run is ambiguous: "), \
        failed.output
    assert "checkpoints/older" in failed.output and "checkpoints/newer" in failed.output
    assert "--train.run_dir" in failed.output and len(failed.output.strip().splitlines()) == 1


def test_stages_run_without_what_they_need_say_it_with_an_example(tmp_path, monkeypatch):
    for command, script, needs in ((["precompute"], "01_precompute.py", "needs the dataset folder"),
                                   (["align"], "02_align.py", "needs the audio store"),
                                   (["train"], "03_train.py", "needs the audio store"),
                                   (["precompute-captions"], "01_precompute_captions.py", "needs the dataset folder")):
        failed = _in_process(tmp_path, monkeypatch, *command)
        assert failed.exit_code == 2 and failed.output.startswith(f"error: {script[:-3]} {needs}"), failed.output
        example = failed.output.split("e.g. ", 1)[1]
        assert example.startswith("uv run stages/") and f"uv run stages/{script} " in example
    store = tmp_path / "shards" / "birds" / "whisper-tiny-abc"
    store.mkdir(parents=True)
    (store / "meta.json").write_text("{}")
    failed = _in_process(tmp_path, monkeypatch, "train")  # the stores that are here are named
    assert failed.exit_code == 2 and "stores here: shards/birds/whisper-tiny-abc" in failed.output, failed.output
    # the scripts themselves, as typed: one of them in a real process
    failed = _stage(tmp_path, str(ROOT / "stages" / "01_precompute.py"))
    assert failed.returncode == 2 and failed.stdout.startswith("error: 01_precompute needs the dataset folder")
    assert not failed.stderr


@pytest.mark.slow
def test_under_torchrun_resume_alone_picks_the_run_once_and_an_error_is_printed_once_and_is_the_root_cause(
        two_runs, tmp_path):
    project = _project(two_runs, tmp_path)
    done = _stage(project, str(ROOT / "stages" / "03_train.py"), "--resume", torchrun=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("resuming the most recent run checkpoints/newer") == 1
    assert max(logged_losses(project / "checkpoints" / "newer")) == 4

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _stage(empty, str(ROOT / "stages" / "03_train.py"), "--resume", torchrun=True)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 2, output  # the stage's own exit code for a bad input, not torchrun's 1
    assert [line for line in failed.stdout.splitlines() if line.startswith("error:")] == [
        line for line in failed.stdout.splitlines() if "no run found" in line]
    assert failed.stdout.count("error: no run found") == 1, output
    last = failed.stderr.strip().splitlines()[-1]  # what a user reads last: the error, not a traceback
    assert re.match(r"torchrun: [12] process\(es\) failed; rank [01] exited with code 2: error: no run found", last), \
        output  # whichever rank torchrun saw fail first
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr, output
