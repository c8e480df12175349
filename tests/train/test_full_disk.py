"""A disk that fills up mid-run: precompute and training on a small tmpfs that the test mounts (root only;
skipped with the reason elsewhere). Each says which folder is full and how many bytes it needed, keeps what it
committed (the store verifies, latest.json points to a complete checkpoint), and once space is freed the same
command finishes with the same store bytes / the same weights as a run that never hit the full disk."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import DiskFullError, read_json
from mellow.settings import ModelConfig
from mellow.store.integrity import committed_shards, verify_store
from mellow.train import checkpoint, loop

from conftest import TINY_ARGS, TINY_MODEL, assert_same_store, latest_weights, logged_losses, train_config

runner = CliRunner()


def invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 64 MiB tmpfs mounted for this test, unmounted after it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all of the disk's free space but `leave` bytes."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave
    descriptor = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(descriptor, 0, size)
    finally:
        os.close(descriptor)
    return filler


def store_files(store: Path) -> dict[str, bytes]:
    return {str(path.relative_to(store)): path.read_bytes() for path in sorted((store / "store.zarr").rglob("*"))
            if path.is_file()}


def test_precompute_on_a_full_disk_keeps_its_shards_and_finishes_the_same_store_once_space_is_freed(
        small_disk, tiny_dataset, tmp_path):
    def precompute(root: Path) -> tuple[int, str]:
        return invoke("precompute", tiny_dataset, "--encoder", "mel", "--clip-seconds", 3, "--tokens", 64,
                      "--shard-clips", 4, "--store-root", root)

    # the run that never hits a full disk, on the same disk, tells how much room a whole store takes there
    used_before = shutil.disk_usage(small_disk).used
    code, output = precompute(small_disk / "reference")
    assert code == 0, output
    whole_store = shutil.disk_usage(small_disk).used - used_before
    [reference] = (small_disk / "reference" / "synth").iterdir()
    shutil.copytree(reference, tmp_path / "reference")
    reference = tmp_path / "reference"
    shutil.rmtree(small_disk / "reference")

    filler = fill(small_disk, leave=whole_store // 2)
    code, output = precompute(small_disk / "shards")
    [store] = (small_disk / "shards" / "synth").iterdir()
    flat = " ".join(output.split())
    assert code == 1, output
    assert f"no space left in {store}" in flat and "needs about" in flat and "are free" in flat, output
    assert "Traceback" not in output
    done, total = committed_shards(store)
    assert 0 < len(done) < total  # it filled up mid-run
    assert verify_store(store) == []  # what it committed reads back; nothing half-written is committed
    code, output = invoke("store", "verify", store)
    assert code == 0 and f"the {len(done)} committed shard(s) of {total} are intact" in " ".join(output.split())

    filler.unlink()
    code, output = precompute(small_disk / "shards")
    assert code == 0, output
    assert_same_store(reference, store)
    assert store_files(store) == store_files(reference)  # byte for byte


TRAIN_SETTINGS = dict(max_updates=8, batch_size=4, lr=3e-3, warmup_updates=2, save_every=2, keep_last=1, val_every=0,
                      log_every=1, seed=3)  # the same in-process and on the command line


def _train(store: Path, dataset: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    settings = [f"--train.{key}={value}" for key, value in TRAIN_SETTINGS.items()]
    return invoke("train", f"--train.store={store}", f"--train.dataset={dataset}", f"--train.run_dir={run_dir}",
                  *settings, *TINY_ARGS, *extra)


@pytest.mark.parametrize("when", ["refused before writing", "while writing"])
def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes_to_the_same_weights(
        when, small_disk, mel_store, tiny_dataset, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    code, output = _train(mel_store, tiny_dataset, reference)
    assert code == 0, output
    checkpoint_bytes = sum(path.stat().st_size for path in (reference / "step-000008").iterdir())

    run_dir = small_disk / "run"
    filler = fill(small_disk, leave=checkpoint_bytes * 3 // 2)  # room for the first checkpoint, not the second
    if when == "refused before writing":
        # in-process, the error keeps its traceback (and the frames holding the data loader) alive: its worker
        # processes must still have ended, or this process would never exit
        config = train_config(mel_store, tiny_dataset, run_dir, **TRAIN_SETTINGS)
        with pytest.raises(DiskFullError) as caught:
            loop.run(config, ModelConfig(**TINY_MODEL, projector_dropout=0.0))
        message = str(caught.value)
        assert multiprocessing.active_children() == []
    else:  # as if another program took the space between the check and the write; through the command line
        monkeypatch.setattr(checkpoint, "check_free_space", lambda *args: None)
        code, output = _train(mel_store, tiny_dataset, run_dir)
        assert code == 1 and "Traceback" not in output, output
        message = " ".join(output.split())
    assert f"no space left in {run_dir}: checkpoint step-000004" in message and "needs about" in message, message
    assert read_json(run_dir / "latest.json") == {"path": "step-000002", "update": 2}
    assert not list(run_dir.glob(".step-*"))  # the half-written checkpoint is gone, and its space with it
    assert (set(torch.load(run_dir / "step-000002" / "model.pt")) == set(latest_weights(reference)))
    torch.load(run_dir / "step-000002" / "optimizer.pt")

    filler.unlink()
    monkeypatch.undo()
    code, output = _train(mel_store, tiny_dataset, run_dir, "--resume")
    assert code == 0, output
    assert logged_losses(run_dir) == logged_losses(reference)
    first, second = latest_weights(reference), latest_weights(run_dir)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
