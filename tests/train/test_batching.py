"""Token-budget batches (--train.batch_tokens): planned from lengths alone, deterministic in (seed, epoch), every
example once an epoch, no batch over its budget, little padding, a random order of batches, ranks and resumes
that continue one sequence; and a training run on them that stops and resumes bitwise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mellow.distributed import DistributedContext
from mellow.files import read_json
from mellow.settings import ModelConfig
from mellow.train import loop
from mellow.train.batching import BudgetTooSmallError, TokenBatches, bucket_of, cut_to_budget, epoch_token_batches

from conftest import TINY_MODEL, latest_weights, logged_losses, train_config


def _reasonaqa_like(count: int, seed: int = 0) -> np.ndarray:
    """Positions of ReasonAQA-shaped examples: 2 x 64 audio tokens + separators, prompts of 10-40 and answers of
    1-160 tokens."""
    generator = np.random.default_rng(seed)
    return 130 + generator.integers(10, 41, count) + generator.integers(1, 161, count)


def _batches(examples: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [examples[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def test_an_epoch_holds_every_example_once_within_budget_with_little_padding():
    positions = _reasonaqa_like(5000)
    examples, offsets = epoch_token_batches(positions, 2048, seed=3, epoch=0, buckets=bucket_of(positions, 16))
    assert sorted(examples.tolist()) == list(range(5000))
    batches = _batches(examples, offsets)
    computed = [len(batch) * positions[batch].max() for batch in batches]
    assert max(computed) <= 2048
    useful = positions.sum() / sum(computed)
    assert useful > 0.9, useful
    # most batches are full: the budget is used, not just respected
    assert np.median(computed) > 0.9 * 2048
    # without buckets the same budget wastes far more
    plain_examples, plain_offsets = epoch_token_batches(positions, 2048, 3, 0, bucket_of(positions, 1))
    plain = positions.sum() / sum(len(b) * positions[b].max() for b in _batches(plain_examples, plain_offsets))
    assert plain < useful - 0.1, (plain, useful)


def test_the_plan_is_a_pure_function_of_seed_and_epoch_and_random_at_the_batch_level():
    positions = _reasonaqa_like(3000)
    buckets = bucket_of(positions, 16)
    first = epoch_token_batches(positions, 2048, 3, 0, buckets)
    again = epoch_token_batches(positions, 2048, 3, 0, buckets)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    for other in (epoch_token_batches(positions, 2048, 3, 1, buckets), epoch_token_batches(positions, 2048, 4, 0,
                                                                                            buckets)):
        assert not np.array_equal(first[0], other[0])
    longest = [positions[batch].max() for batch in _batches(*first)]
    # the batches' lengths are not in bucket order: their rank correlation with the batch number is near 0
    ranks = np.argsort(np.argsort(longest))
    correlation = np.corrcoef(ranks, np.arange(len(ranks)))[0, 1]
    assert abs(correlation) < 0.2, correlation


def test_a_cut_keeps_each_batch_within_the_budget():
    positions = np.array([10, 30, 30, 5, 50, 50, 50, 20])
    cuts = cut_to_budget(positions, 100)
    assert cuts.tolist() == [0, 3, 5, 7, 8]  # 3 x 30, 2 x 50, 2 x 50, 1 x 20 (a third 50 would make 150)
    assert cut_to_budget(np.array([100]), 100).tolist() == [0, 1]


def test_a_budget_smaller_than_an_example_names_it(tmp_path):
    split = tmp_path / "train.jsonl"
    positions = np.array([40, 41, 97, 60])
    with pytest.raises(BudgetTooSmallError, match=r"--train.batch_tokens 64 .* example at .*train.jsonl:8, which "
                                                  r"takes 97 positions.*at least 97"):
        TokenBatches(positions, 64, 1, 0, 4, split=split, line=np.array([0, 3, 7, 9]))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_one_sequence_of_batches_across_epochs_and_a_resume_continues_it(world):
    positions = _reasonaqa_like(300)
    plan = TokenBatches(positions, 1024, batches_per_update=2 * world, seed=1, buckets=8)
    one = list(itertools.islice(plan.stream(0, DistributedContext(0, 1, 0)), 200))  # several epochs
    assert len({epoch for epoch, _ in one}) >= 3
    streams = [plan.stream(0, DistributedContext(rank, world, rank)) for rank in range(world)]
    interleaved = [next(streams[k % world]) for k in range(200)]
    assert interleaved == one
    # a run that stopped after 7 updates of world x 2 batches continues at batch 7 x world x 2, on any world size
    # that shares an update
    start = 7 * plan.per_update(world)
    assert plan.micro_steps(world) == 2 and plan.micro_steps(1) == 2 * world
    with pytest.raises(ValueError, match="cannot share evenly"):
        plan.micro_steps(5)
    for ranks in (1, 2):
        resumed = [plan.stream(start, DistributedContext(rank, ranks, rank)) for rank in range(ranks)]
        assert [next(resumed[k % ranks]) for k in range(40)] == one[start : start + 40]
    assert plan.locate(start)[0] == one[start][0]


def test_an_epoch_of_fewer_batches_than_ranks_still_feeds_every_rank():
    plan = TokenBatches(np.array([10, 10, 10]), 30, 1, seed=0, buckets=1)  # one batch an epoch
    streams = [plan.stream(0, DistributedContext(rank, 4, rank)) for rank in range(4)]
    assert [next(streams[rank])[0] for rank in range(4)] == [0, 1, 2, 3]


def test_training_on_a_token_budget_stops_and_resumes_bitwise(mel_store, tiny_dataset, tmp_path):
    model = ModelConfig(**TINY_MODEL)
    overrides = dict(batch_tokens=160, grad_accum=2, max_updates=8, save_every=4, log_every=1)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    loop.run(train_config(mel_store, tiny_dataset, straight, **overrides), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, stop_after=3, **overrides), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, **overrides), model, resume=True)
    assert logged_losses(stopped) == logged_losses(straight) and len(logged_losses(straight)) == 8
    first, second = latest_weights(straight), latest_weights(stopped)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert read_json(straight / "step-000008" / "trainer.json")["micro_batches"] == 16  # device batches


def test_training_refuses_a_budget_below_its_longest_example(mel_store, tiny_dataset, tmp_path):
    with pytest.raises(BudgetTooSmallError, match=r"train.jsonl:\d+, which takes \d+ positions"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "run", batch_tokens=20), ModelConfig(**TINY_MODEL))
