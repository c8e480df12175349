"""`mellow doctor` on a healthy setup, and on the broken ones it exists for: stale or inconsistent rank
variables, a rendezvous port already taken, an ffmpeg that is not there, an output folder that cannot be
written, and a planned store larger than the disk."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from mellow.cli import app
from mellow.doctor import check_java, check_rank_variables, planned_store_bytes
from mellow.settings import EncoderConfig

runner = CliRunner()
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_NTASKS", "SLURM_JOB_ID", "MELLOW_FFMPEG")


def _doctor(monkeypatch, *args: str, **env: str):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runner.invoke(app, ["doctor", *args])


def _line(output: str, name: str) -> str:
    """The line of check `name` (not of a fix under it)."""
    return next(line for line in output.splitlines() if line.split()[:1] in (["ok"], ["warn"], ["FAIL"])
                and f" {name} " in line)


def test_a_healthy_machine_passes_and_a_dataset_store_is_sized(monkeypatch, tmp_path, tiny_dataset):
    result = _doctor(monkeypatch, "--store-root", str(tmp_path / "shards"), "--checkpoints", str(tmp_path / "ckpt"),
                     "--dataset", str(tiny_dataset), "--encoder", "mel", "--tokens", "4")
    assert result.exit_code == 0, result.output
    assert _line(result.output, "ffmpeg").startswith("ok") and "encoded and decoded a FLAC tone" in result.output
    assert _line(result.output, "rank variables").startswith("ok")
    assert "24 clips x 1 views x 4 tokens x 80 (mel) x 2 bytes = 0.00 GiB (15,360 bytes)" in _line(result.output,
                                                                                                    "disk")
    assert "0 failed - ready" in result.output


def test_every_broken_thing_is_named_with_its_fix_and_the_exit_code_is_1(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _doctor(monkeypatch, "--store-root", str(blocker / "shards"), RANK="0", WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MELLOW_FFMPEG=str(tmp_path / "no-ffmpeg"))
    assert result.exit_code == 1, result.output
    output = result.output
    assert _line(output, "ffmpeg").startswith("FAIL") and "MELLOW_FFMPEG" in _line(output, "ffmpeg")
    assert _line(output, "rendezvous port").startswith("FAIL") and f"127.0.0.1:{port}" in output
    assert "pick another" in output and "MELLOW_RDZV_PORT" in output
    assert _line(output, "writable: --store-root").startswith("FAIL") and "a-file is not a folder" in output
    assert _line(output, "rank variables").startswith("ok")  # RANK 0 of 2 with a master: consistent
    assert "3 failed" in output


def test_rank_variables_that_cannot_work_together():
    def problems(**env: str) -> str:
        [check] = [c for c in check_rank_variables(env) if c.name == "rank variables"]
        return check.status + " " + check.found

    assert problems(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1").startswith("fail")
    assert "RANK=2 is not below WORLD_SIZE=2" in problems(RANK="2", WORLD_SIZE="2", MASTER_ADDR="x", MASTER_PORT="1")
    assert "WORLD_SIZE is set but RANK is not" in problems(WORLD_SIZE="2")
    assert "without MASTER_ADDR and MASTER_PORT" in problems(RANK="0", WORLD_SIZE="4")
    assert "'two' is not a number" in problems(RANK="two", WORLD_SIZE="2")
    assert "LOCAL_RANK=3 is not below LOCAL_WORLD_SIZE=2" in problems(LOCAL_RANK="3", LOCAL_WORLD_SIZE="2")
    assert "does not resolve" in problems(RANK="0", WORLD_SIZE="1", MASTER_ADDR="no-such-host.invalid")
    assert "mellow reads SLURM ranks only with MASTER_ADDR" in problems(SLURM_NTASKS="4")
    assert problems().startswith("ok") and problems(RANK="1", WORLD_SIZE="2", MASTER_ADDR="localhost",
                                                    MASTER_PORT="29500").startswith("ok")


def test_a_planned_store_larger_than_the_disk_fails(monkeypatch, tmp_path, tiny_dataset):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    # tokens such that 24 clips of 80-wide float16 tokens (mel) need more than the free space
    tokens = free // (24 * 80 * 2) + 1
    assert planned_store_bytes(24, EncoderConfig(name="mel", tokens=tokens), 80) > free
    result = _doctor(monkeypatch, "--store-root", str(tmp_path), "--dataset", str(tiny_dataset), "--encoder", "mel",
                     "--tokens", str(tokens))
    assert result.exit_code == 1 and _line(result.output, "disk").startswith("FAIL"), result.output
    assert "fewer --tokens/--views" in result.output


def test_java_is_checked_because_meteor_needs_it(monkeypatch):
    from mellow.evaluate import metrics

    found = check_java()
    assert (found.status, found.name) == ("ok", "java") and "METEOR" in found.found  # this machine has Java
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    missing = check_java()
    assert missing.status == "warn" and "skips METEOR" in missing.found and "apt-get install" in missing.fix
