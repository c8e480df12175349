"""stages/slurm/*.sbatch on a real scheduler: a single-machine SLURM (slurmctld + slurmd + munge on loopback,
started by tests/local_slurm.sh, which installs Debian's packages when it can). Skipped, with the reason, where
it cannot run (not root, no apt-get, daemons that do not start).

Not in the default suite (it installs system packages and takes minutes): `uv run pytest -m slurm`; .ci/run
runs it after the default suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mellow.files import read_jsonl

from conftest import TINY_ARGS, assert_same_store, latest_weights, logged_losses

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "stages" / "slurm"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment for sbatch & co. with a running single-machine SLURM of this test's own (its own config
    and ports, so a machine's real SLURM is not touched), or a skip that says why there is none."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MELLOW_SLURMCTLD_PORT": "16817", "MELLOW_SLURMD_PORT": "16818"}
    started = subprocess.run(["bash", str(REPO / "tests" / "local_slurm.sh"), str(folder)], capture_output=True,
                             text=True, env=env, timeout=900)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    yield {**env, "SLURM_CONF": str(folder / "slurm.conf"), "MELLOW_DIR": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(REPO / "tests" / "local_slurm.sh"), "--stop", str(folder)], timeout=60)


def _sbatch(env: dict, folder: Path, script: str, *options: str, args: list) -> str:
    """Submit a script of stages/slurm from `folder` (where its log goes); the job id."""
    completed = subprocess.run(["sbatch", "--parsable", *options, str(SCRIPTS / script), *map(str, args)],
                               capture_output=True, text=True, env=env, cwd=folder, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip().split(";")[0]


def _wait_for_job(env: dict, job: str, seconds: float) -> list[dict[str, str]]:
    """`scontrol show job` of the job (one record per array task) once every part of it has ended."""
    deadline = time.time() + seconds
    while True:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env,
                               timeout=60).stdout
        records = [dict(field.split("=", 1) for field in line.split() if "=" in field)
                   for line in shown.splitlines() if line.strip()]
        if records and all(record["JobState"] in ENDED for record in records):
            return records
        assert time.time() < deadline, f"job {job} did not end in {seconds:.0f} s: {shown}"
        time.sleep(2)


def test_a_precompute_array_writes_the_store_a_local_run_writes(slurm, tiny_dataset, mel_store, tmp_path):
    # the local run: conftest's mel_store (3 shards of 8 clips); here 3 array tasks, 2 at a time on 2 CPUs
    job = _sbatch(slurm, tmp_path, "precompute.sbatch", "--array=0-2", "--cpus-per-task=1", args=[
        tiny_dataset, "--encoder", "mel", "--clip-seconds", "3", "--tokens", "4", "--shard-clips", "8",
        "--store-root", tmp_path / "shards"])
    records = _wait_for_job(slurm, job, 600)
    logs = "".join(path.read_text() for path in tmp_path.glob("slurm-mellow-precompute-*.out"))
    assert [record["JobState"] for record in records] == ["COMPLETED"] * 3, logs[-3000:]
    store = tmp_path / "shards" / mel_store.parent.name / mel_store.name
    assert_same_store(mel_store, store)
    assert logs.count("precomputed") == 1  # the last task to finish wrote the index, once


def _train_args(store: Path, dataset: Path, run_dir: Path, updates: int) -> list[str]:
    return [f"--train.store={store}", f"--train.dataset={dataset}", f"--train.run_dir={run_dir}",
            "--train.batch_size=4", "--train.log_every=10", "--train.val_every=0", "--train.save_every=100000",
            f"--train.max_updates={updates}", "--train.stop_margin=15", "--train.seed=7", *TINY_ARGS]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "stages" / "03_train.py"), *args]


def test_a_training_job_past_its_time_limit_saves_requeues_and_ends_with_the_uninterrupted_weights(
        slurm, mel_store, tiny_dataset, tmp_path):
    # How many updates two processes make per second here, so that the run needs more than one 1-minute job
    calibration = tmp_path / "calibration"
    subprocess.run(_torchrun(*_train_args(mel_store, tiny_dataset, calibration, 100)), env=slurm, check=True,
                   capture_output=True, timeout=300)
    updates_per_second = read_jsonl(calibration / "metrics.jsonl")[-1]["samples_per_s"] / 4
    # ~100 s of training alone, more beside the reference run below; a 2-minute job holds at most ~60 s of it:
    # start-up took up to 45 s on a busy 2-core machine, then the stop margin, then the processes' exit (~6 s)
    updates = int(updates_per_second * 100) // 10 * 10
    interrupted, straight = tmp_path / "slurm-run", tmp_path / "straight"
    job = _sbatch(slurm, tmp_path, "train.sbatch", "--time=2", "--cpus-per-task=2",
                  "--export=ALL,NPROC_PER_NODE=2", args=_train_args(mel_store, tiny_dataset, interrupted, updates))
    reference = subprocess.run(_torchrun(*_train_args(mel_store, tiny_dataset, straight, updates)), env=slurm,
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    [record] = _wait_for_job(slurm, job, 900)
    log = (tmp_path / f"slurm-mellow-train-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert int(record["Restarts"]) >= 1, log[-4000:]  # it did not fit in one job: it was requeued
    # each time: saved, asked for the requeue, and the script requeued once every process had ended
    assert log.count("stopped early (") == int(record["Restarts"])
    assert log.count(f"SLURM job {job} is to be requeued") == int(record["Restarts"])
    assert log.count(f"requeueing job {job}") == int(record["Restarts"])
    assert "Traceback" not in log and "Error" not in log
    assert logged_losses(interrupted) == logged_losses(straight)
    assert max(logged_losses(interrupted)) == updates
    first, second = latest_weights(straight), latest_weights(interrupted)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
