"""One objective whatever the split: after one update, the gradients of 32 examples are the same as one batch,
as micro-batches of 8 x 4 or of uneven sizes, and as 16 x 2 ranks under torchrun (gloo), for both loss
weightings (fp32, 1e-5); and the same for token-budget batches: four device batches accumulated on one process,
two on each of two ranks, or all in one micro-batch. The loss is the mean over the update's examples or answer
tokens, with the counts all-reduced before the backward (a mean per micro-batch made token weighting depend on
the neighbours)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from one_update import gradients

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _close(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == found.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(found[name], gradient, rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def whole_batch(mel_store, tiny_dataset):
    return {weighting: gradients(mel_store, tiny_dataset, weighting, [32]) for weighting in ("example", "token")}


@pytest.mark.parametrize("weighting", ["example", "token"])
@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [12, 4, 9, 7]], ids=["8x4", "uneven"])
def test_micro_batches_train_the_objective_of_the_whole_batch(whole_batch, mel_store, tiny_dataset, weighting,
                                                               sizes):
    _close(whole_batch[weighting], gradients(mel_store, tiny_dataset, weighting, sizes))


def test_the_answer_token_counts_differ_between_micro_batches(mel_store, tiny_dataset):
    """What makes the token case a test: a mean per micro-batch would weigh these tokens differently."""
    from mellow.model.decoders import load_tokenizer
    from mellow.store.reader import EmbeddingStore
    from mellow.train.data import ExampleSet, load_examples

    examples = ExampleSet(load_examples(tiny_dataset, "train"), EmbeddingStore(mel_store), load_tokenizer("tiny"),
                          max_text_tokens=96)
    counts = [int((examples.batch(list(range(start, start + 8)))["labels"] != -100).sum()) for start in (0, 8, 16, 24)]
    assert len(set(counts)) > 1, counts


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("weighting", ["example", "token"])
def test_two_ranks_train_the_objective_of_one_process(whole_batch, mel_store, tiny_dataset, weighting, tmp_path):
    out = tmp_path / "gradients.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "one_update.py"), str(mel_store), str(tiny_dataset), str(out), "--weighting",
                           weighting, "--sizes", "16"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    _close(whole_batch[weighting], torch.load(out))


TOKENS = 160  # device batches of 2-5 of the tiny dataset's examples


@pytest.fixture(scope="module")
def token_update(mel_store, tiny_dataset):
    return {weighting: gradients(mel_store, tiny_dataset, weighting, batch_tokens=TOKENS, accum=4, merged=True)
            for weighting in ("example", "token")}


@pytest.mark.parametrize("weighting", ["example", "token"])
def test_token_budget_batches_accumulated_train_the_objective_of_their_union(token_update, mel_store, tiny_dataset,
                                                                              weighting):
    _close(token_update[weighting], gradients(mel_store, tiny_dataset, weighting, batch_tokens=TOKENS, accum=4))


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("weighting", ["example", "token"])
def test_token_budget_batches_on_two_ranks_train_the_objective_of_one_process(token_update, mel_store,
                                                                               tiny_dataset, weighting, tmp_path):
    out = tmp_path / "gradients.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "one_update.py"), str(mel_store), str(tiny_dataset), str(out), "--weighting",
                           weighting, "--batch-tokens", str(TOKENS), "--accum", "2"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    _close(token_update[weighting], torch.load(out))
