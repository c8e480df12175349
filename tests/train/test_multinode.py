"""Several nodes without SLURM: one torchrun per node, as docs/cluster.md tells users to start them. Two "nodes"
on one machine (two torchrun launchers with --nnodes=2 on loopback) must train exactly as one node with two
processes does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mellow.files import read_json

from conftest import TINY_ARGS, latest_weights, logged_losses

REPO = Path(__file__).resolve().parents[2]
STAGE = str(REPO / "stages" / "03_train.py")


def _train_args(store: Path, dataset: Path, run_dir: Path) -> list[str]:
    return [STAGE, f"--train.store={store}", f"--train.dataset={dataset}", f"--train.run_dir={run_dir}",
            "--train.batch_size=4", "--train.max_updates=6", "--train.save_every=3", "--train.log_every=1",
            "--train.val_every=0", "--train.seed=7", *TINY_ARGS]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_exactly_like_one_node_with_two_processes(mel_store, tiny_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               *_train_args(mel_store, tiny_dataset, tmp_path / "two-nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    one_node = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *_train_args(mel_store, tiny_dataset, tmp_path / "one-node")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    assert "trained" in outputs[0] and "trained" not in outputs[1]  # only rank 0 (on node 0) reports
    assert read_json(tmp_path / "two-nodes" / "step-000006" / "trainer.json")["world_size"] == 2
    assert logged_losses(tmp_path / "two-nodes") == logged_losses(tmp_path / "one-node")
    first, second = latest_weights(tmp_path / "one-node"), latest_weights(tmp_path / "two-nodes")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    # each rank saved its own random state into the same checkpoint folder: a run folder must be shared storage
    assert sorted(p.name for p in (tmp_path / "two-nodes" / "step-000006").glob("rng-rank*.pt")) == [
        "rng-rank0.pt", "rng-rank1.pt"]
