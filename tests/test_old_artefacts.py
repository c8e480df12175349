"""What the code before the package layout wrote still works: a dataset, a store and a half-trained run written by
commit 2d523d3 (flat modules, a flat train: section) are read, verified, resumed, scored and exported by this
code, and the resumed run's losses are the uninterrupted old run's, bitwise.

The old code is taken from git history (`git archive`) and run with this environment's packages; a clone without
that commit (a shallow one) skips the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mellow.files import read_json
from mellow.store.reader import EmbeddingStore

from conftest import TINY_ARGS, logged_losses

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "2d523d368cd40ba5b5fbe1c1c6ad60a35c4e560e"  # the last commit of the flat layout
TRAIN = ["--train.max_updates", "8", "--train.batch_size", "4", "--train.save_every", "2", "--train.val_every",
         "0", "--train.log_every", "1", "--train.warmup_updates", "2", "--train.seed", "5", "--train.lr", "3e-3",
         "--train.data_workers", "0", *TINY_ARGS]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_code(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("old-code")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "mellow", "stages"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT[:7]} is not in this clone: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    assert (folder / "mellow" / "train.py").is_file()  # the flat layout indeed
    return folder


def run(code: Path | None, script: str, *args, cwd: Path) -> str:
    """Run a stage script of the old code (`code`) or of this one (None) in `cwd`; its output."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    stages = (code or REPO) / "stages"
    completed = subprocess.run([sys.executable, str(stages / script), *map(str, args)], capture_output=True,
                               text=True, cwd=cwd, env=env, timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_a_store_and_run_of_the_old_code_read_verify_resume_score_and_export(old_code, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run(old_code, "00_prepare.py", "--source", "synth", "--num-clips", 24, "--max-seconds", 2.5, cwd=work)
    run(old_code, "01_precompute.py", "datasets/synth", "--encoder", "mel", "--tokens", 4, "--clip-seconds", 2.5,
        "--shard-clips", 6, cwd=work)
    [store] = (work / "shards" / "synth").iterdir()
    run(old_code, "03_train.py", "--train.store", store, "--train.run_dir", "cut", "--train.stop_after", 4,
        *TRAIN, cwd=work)
    run(old_code, "03_train.py", "--train.store", store, "--train.run_dir", "straight", *TRAIN, cwd=work)
    assert "lr" in read_json(work / "cut" / "step-000004" / "trainer.json")["config"]["train"]  # the flat section

    assert "already prepared" in run(None, "00_prepare.py", "--source", "synth", "--num-clips", 24,
                                     "--max-seconds", 2.5, cwd=work)
    assert "0 shard(s) computed, 4 already done" in run(None, "01_precompute.py", "datasets/synth", "--encoder",
                                                        "mel", "--tokens", 4, "--clip-seconds", 2.5,
                                                        "--shard-clips", 6, cwd=work)
    verified = subprocess.run([sys.executable, "-m", "mellow.cli", "store", "verify", str(store)],
                              capture_output=True, text=True, cwd=work)
    assert verified.returncode == 0 and "verified" in verified.stdout, verified.stdout + verified.stderr
    assert EmbeddingStore(store).load_all()[0].shape[0] == 24

    resumed = run(None, "03_train.py", "--resume", "--train.run_dir", "cut", cwd=work)
    assert "resuming cut from update 4 (step-000004)" in resumed
    old, new = logged_losses(work / "straight"), logged_losses(work / "cut")
    assert [new[update] for update in range(1, 9)] == [old[update] for update in range(1, 9)]  # bitwise

    scored = run(None, "04_eval.py", "cut", "--which", "latest", "--max-examples", 8, "--no-similarity", cwd=work)
    assert "step-000008" in scored
    run(None, "04_eval.py", "straight", "--which", "latest", "--max-examples", 8, "--no-similarity", cwd=work)
    completed = subprocess.run([sys.executable, "-m", "mellow.cli", "export", "--checkpoint", "straight",
                                "--out", "exported"], capture_output=True, text=True, cwd=work)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    card = (work / "exported" / "README.md").read_text()
    assert "batch 4, learning rate 0.003" in card
