"""Training under the bad things that happen on clusters, with real processes and real signals: kill -9 and
exact resume (one process and torchrun x2), resume at another world size, SIGTERM/SIGUSR1 to one rank, time
limits (own and SLURM's), SLURM requeue, a rank that dies, and ranks with uneven validation shares."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mellow.files import read_json, read_jsonl

from conftest import TINY_ARGS, latest_weights, logged_losses

REPO = Path(__file__).resolve().parents[2]
STAGE = str(REPO / "stages" / "03_train.py")


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def _command(store: Path, dataset: Path, run_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    return [*_launcher(processes), STAGE, f"--train.store={store}", f"--train.dataset={dataset}",
            f"--train.run_dir={run_dir}", "--train.batch_size=4", "--train.log_every=1", "--train.val_every=0",
            "--train.seed=7", *TINY_ARGS, *extra]


def _resume(run_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    """Only the run folder: the run's own saved config supplies the rest."""
    return [*_launcher(processes), STAGE, f"--train.run_dir={run_dir}", "--resume", *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(command: list[str], env: dict | None = None, expect: int = 0) -> str:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env or _env())
    output = completed.stdout + completed.stderr
    assert completed.returncode == expect, output[-4000:]
    return output


def _start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or _env(), start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _finish(process: subprocess.Popen, seconds: float = 120) -> tuple[int, str]:
    output, _ = process.communicate(timeout=seconds)
    return process.returncode, output


def _workers(launcher_pid: int) -> dict[int, int]:
    """{local rank: pid} of the worker processes a torchrun launcher started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [item for item in environment if item.startswith(b"LOCAL_RANK=")]
        if parent == launcher_pid and rank:
            workers[int(rank[0].split(b"=")[1])] = int(entry.name)
    return workers


def _fake_scontrol(folder: Path) -> dict:
    """An `scontrol` on PATH that records its arguments, and the SLURM variables of a job."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\n')
    script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["size", "tokens"])
@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_mid_epoch_then_resume_gives_the_same_losses_and_weights(mel_store, tiny_dataset, tmp_path,
                                                                        processes, batching):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ["--train.max_updates=24", "--train.save_every=4"]  # 184 examples, 4 a batch: all in epoch 0
    if batching == "tokens":  # device batches of 2-5 examples, ~45 an epoch: 2 ranks cross into epoch 1
        extra.append("--train.batch_tokens=160")
    _run(_command(mel_store, tiny_dataset, straight, *extra, processes=processes))
    process = _start(_command(mel_store, tiny_dataset, killed, *extra, processes=processes))
    _wait_for(killed / "step-000008", process)
    for pid in [*_workers(process.pid).values(), process.pid]:  # as if the node died: every process at once
        os.kill(pid, signal.SIGKILL)  # (torchrun starts its workers in sessions of their own)
    process.wait()
    saved = read_json(killed / "latest.json")["update"]
    assert 8 <= saved < 24, saved
    output = _run(_resume(killed, processes=processes))
    assert f"from update {saved}" in output
    if batching == "size":
        assert f"epoch 0, micro-batch {saved} of it" in output
    assert logged_losses(killed) == logged_losses(straight) and len(logged_losses(straight)) == 24
    first, second = latest_weights(straight), latest_weights(killed)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    for rank in range(processes):  # every rank's random states are in the checkpoint
        assert (killed / "step-000024" / f"rng-rank{rank}.pt").is_file()
    assert set(torch.load(killed / "step-000024" / "rng-rank0.pt", weights_only=False)) == {
        "python", "numpy", "torch", "cuda", "log_window"}
    assert set(torch.load(killed / "step-000024" / "optimizer.pt", weights_only=False)) == {
        "optimizer", "scheduler", "scaler"}
    trainer = read_json(killed / "step-000024" / "trainer.json")
    per_update = processes if batching == "tokens" else 1  # device batches, or global micro-batches
    assert trainer["micro_batches"] == 24 * per_update and trainer["base_decoder"] == {"decoder": "tiny",
                                                                           "initialised_with_seed": 7}


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["size", "tokens"])
def test_resume_at_another_world_size_continues_the_data_order(mel_store, tiny_dataset, tmp_path, batching):
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    extra = ["--train.max_updates=10", "--train.save_every=5"]
    if batching == "tokens":  # updates of 2 device batches: one process then accumulates both
        extra.append("--train.batch_tokens=160")
    _run(_command(mel_store, tiny_dataset, straight, *extra, processes=2))
    _run(_command(mel_store, tiny_dataset, changed, *extra, "--train.stop_after=5", processes=2))
    output = _run(_resume(changed, processes=1))
    assert "resuming a run saved by 2 process(es) with 1" in output and "not bitwise" in output
    expected, resumed = logged_losses(straight), logged_losses(changed)
    assert [resumed[u] for u in range(1, 6)] == [expected[u] for u in range(1, 6)]
    # the same examples and weights at update 6: only the order of floating-point sums differs
    assert resumed[6] == pytest.approx(expected[6], rel=1e-5)
    assert all(resumed[u] == pytest.approx(expected[u], rel=1e-3) for u in range(7, 11))
    assert read_json(changed / "step-000010" / "trainer.json")["world_size"] == 1


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_update_and_requeues(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    env = _env(**_fake_scontrol(tmp_path / "bin"))
    process = _start(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=5000",
                              "--train.save_every=3", processes=2), env)
    _wait_for(run_dir / "step-000003", process)
    os.kill(_workers(process.pid)[1], signal.SIGUSR1)  # SLURM's --signal=USR1@... reaches one rank first
    code, output = _finish(process)
    assert code == 0, output[-3000:]
    assert "stopped early (another rank received a stop signal)" in output
    latest = read_json(run_dir / "latest.json")["update"]
    assert 3 <= latest < 5000 and max(logged_losses(run_dir)) == latest  # saved where it stopped
    assert {p.name for p in (run_dir / f"step-{latest:06d}").glob("rng-rank*.pt")} == {"rng-rank0.pt",
                                                                                        "rng-rank1.pt"}
    assert (tmp_path / "bin" / "calls.txt").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in output


@pytest.mark.slow
def test_sigterm_stops_a_single_process_cleanly(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    process = _start(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=5000", "--train.save_every=2"))
    _wait_for(run_dir / "step-000002", process)
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM does: every process of the job, data workers included
    code, output = _finish(process)
    assert code == 0 and "stopped early (received SIGTERM)" in output and "Traceback" not in output
    latest = read_json(run_dir / "latest.json")["update"]
    assert max(logged_losses(run_dir)) == latest and f"--resume --train.run_dir {run_dir}" in output.replace("\n", "")


@pytest.mark.slow
def test_time_limits_stop_early_enough_to_save(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "own"
    started = time.time()
    output = _run(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=100000", "--train.save_every=50",
                           "--train.time_limit=6", "--train.stop_margin=0.5"))
    assert "stopped early (time limit:" in output
    run_seconds = float(output.split("saved; last loss")[1].split(" in ")[1].split(" s")[0])
    launch_seconds = time.time() - started - run_seconds  # imports and exit, before train.run's own clock starts
    assert run_seconds <= 6.0 and time.time() - started < 60
    assert read_json(run_dir / "latest.json")["update"] == max(logged_losses(run_dir)) > 10
    # a SLURM job's end time counts the same way (from the job's start, imports included: ~10 s of this machine's
    # 2 cores), and the job requeues itself
    end = time.time() + launch_seconds + 8
    env = _env(**_fake_scontrol(tmp_path / "bin"), SLURM_JOB_END_TIME=str(end))
    output = _run(_command(mel_store, tiny_dataset, tmp_path / "slurm", "--train.max_updates=100000",
                           "--train.save_every=50", "--train.stop_margin=0.5"), env=env)
    assert "stopped early (time limit:" in output
    assert (tmp_path / "slurm" / "latest.json").stat().st_mtime < end  # saved before the job's end
    assert (tmp_path / "bin" / "calls.txt").read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_with_a_clear_error_not_a_hang(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    process = _start(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=5000", "--train.save_every=2",
                              processes=2))
    _wait_for(run_dir / "step-000002", process)
    os.kill(_workers(process.pid)[1], signal.SIGKILL)
    started = time.time()
    code, output = _finish(process, seconds=120)
    assert code != 0 and time.time() - started < 60
    assert "another process of this 2-process run died or stopped answering" in output
    assert f"continue from {run_dir} with --resume" in output.replace("\n", "")
    assert "Signal 9 (SIGKILL) received" in output  # torchrun names the rank that died


@pytest.mark.slow
def test_validation_with_uneven_or_empty_rank_shares_matches_one_process(mel_store, tiny_dataset, tmp_path):
    losses = {}
    for processes, examples in [(1, 5), (2, 5), (1, 1), (2, 1)]:  # 3 + 2 examples; 1 + none
        run_dir = tmp_path / f"{processes}-{examples}"
        _run(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=20", "--train.val_every=20",
                      f"--train.val_examples={examples}", "--train.warmup_updates=2", processes=processes))
        [row] = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in row]
        losses[processes, examples] = row["val_loss"]
    assert losses[2, 5] == pytest.approx(losses[1, 5], rel=1e-4)
    assert losses[2, 1] == pytest.approx(losses[1, 1], rel=1e-4)
    assert losses[1, 1] != pytest.approx(losses[1, 5], rel=1e-3)  # really a different set of examples


def test_usr1_is_left_to_the_deadline_where_the_slurm_end_time_is_known(monkeypatch):
    # a job shorter than the sbatch's --signal=USR1@300 gets USR1 at every start: it must not stop every start
    from mellow.train.stopping import StopControl

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(time.time() + 3600))
    with StopControl(time.time(), 0, True, 5.0, torch.device("cpu")) as stopper:
        stopper.update_took(0.1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.reason_to_stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.reason_to_stop() == "received SIGTERM"
    monkeypatch.delenv("SLURM_JOB_END_TIME")  # no end time known: USR1 is the warning to act on
    with StopControl(time.time(), 0, True, 5.0, torch.device("cpu")) as stopper:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.reason_to_stop() == "received SIGUSR1"


@pytest.mark.slow
def test_ctrl_c_saves_says_how_to_continue_and_the_resume_logs_each_update_once(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    # no checkpoint is due for 1000 updates: what Ctrl-C keeps is what it saves itself
    process = _start(_command(mel_store, tiny_dataset, run_dir, "--train.max_updates=5000", "--train.save_every=1000"))
    deadline = time.time() + 120
    while len(read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []) < 5:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group, workers too
    code, output = _finish(process)
    flat = " ".join(output.split())
    assert code == 130 and "Traceback" not in output, output[-3000:]
    assert "stopped early (received SIGINT)" in flat and f"--resume --train.run_dir {run_dir}" in flat
    latest = read_json(run_dir / "latest.json")["update"]
    assert latest >= 5 and max(logged_losses(run_dir)) == latest
    _run(_resume(run_dir, "--train.stop_after=3"))
    updates = [row["update"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert updates == list(range(1, latest + 4))  # every update once, the interrupted run's rows included


def test_a_second_ctrl_c_exits_at_once():
    from mellow.train.stopping import StopControl

    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN where a shell started this in the background
    with StopControl(time.time(), 0, False, 5.0, torch.device("cpu")) as stopper:
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.reason_to_stop() == "received SIGINT"  # the first one: finish the step, save, stop
        time.sleep(1.1)  # a second press, not the first one seen twice (torchrun forwards what the terminal sent)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back
