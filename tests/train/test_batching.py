"""Token-budget batches (--train.batch_tokens) and packed rows (--train.packing on): planned from lengths alone,
deterministic in (seed, epoch), every example once an epoch, no batch or row over its budget, little padding, a
random order of batches, ranks and resumes that continue one sequence; and training runs on them that stop and
resume bitwise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mellow.distributed import DistributedContext
from mellow.files import read_json, read_jsonl
from mellow.settings import ModelConfig
from mellow.train import loop
from mellow.train.batching import (
    BudgetTooSmallError,
    PackedBatches,
    TokenBatches,
    bucket_of,
    cut_to_budget,
    epoch_packed_batches,
    epoch_token_batches,
)

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


def _stopped_and_resumed(mel_store, tiny_dataset, tmp_path, stop_after: int, **overrides):
    """A run straight through and the same run stopped after `stop_after` updates and resumed: the same losses
    and bitwise the same weights. Returns the straight run's folder."""
    model = ModelConfig(**TINY_MODEL)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    loop.run(train_config(mel_store, tiny_dataset, straight, **overrides), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, stop_after=stop_after, **overrides), model)
    loop.run(train_config(mel_store, tiny_dataset, stopped, **overrides), model, resume=True)
    assert logged_losses(stopped) == logged_losses(straight)
    assert len(logged_losses(straight)) == overrides["max_updates"]
    first, second = latest_weights(straight), latest_weights(stopped)
    assert all(torch.equal(first[key], second[key]) for key in first)
    return straight


def test_training_on_a_token_budget_stops_and_resumes_bitwise(mel_store, tiny_dataset, tmp_path):
    straight = _stopped_and_resumed(mel_store, tiny_dataset, tmp_path, 3, batch_tokens=160, grad_accum=2,
                                    max_updates=8, save_every=4, log_every=1)
    assert read_json(straight / "step-000008" / "trainer.json")["micro_batches"] == 16  # device batches


def test_training_refuses_a_budget_below_its_longest_example(mel_store, tiny_dataset, tmp_path):
    with pytest.raises(BudgetTooSmallError, match=r"train.jsonl:\d+, which takes \d+ positions"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "run", batch_tokens=20), ModelConfig(**TINY_MODEL))


def _packed_useful_share(positions: np.ndarray, row_length: int, rows_per_batch: int, seed: int = 3) -> float:
    examples, offsets, rows = epoch_packed_batches(positions, row_length, rows_per_batch, seed, 0)
    assert sorted(examples.tolist()) == list(range(len(positions)))  # every example once
    computed = 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        row_lengths = np.bincount(rows[start:end], weights=positions[examples[start:end]])
        assert len(row_lengths) <= rows_per_batch and row_lengths.max() <= row_length
        assert (row_lengths > 0).all()  # rows are numbered from 0 without gaps
        computed += len(row_lengths) * row_lengths.max()  # rows x the longest row, as the model computes it
    return float(positions.sum() / computed)


def test_packed_rows_hold_every_example_once_within_their_length_and_are_all_but_full():
    positions = _reasonaqa_like(5000)
    assert _packed_useful_share(positions, 2048, 1) > 0.99  # one row per batch: only its end is left over
    assert _packed_useful_share(positions, 1024, 2) > 0.95  # rows of ~3 examples, topped up best-fit
    short = np.random.default_rng(1).integers(30, 70, 8000)  # quickstart-shaped lengths
    assert _packed_useful_share(short, 256, 4) > 0.95


def test_the_packed_plan_is_pure_keeps_a_row_consecutive_and_lets_no_example_wait_long():
    positions = _reasonaqa_like(3000)
    first = epoch_packed_batches(positions, 1024, 2, 3, 0)
    again = epoch_packed_batches(positions, 1024, 2, 3, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], epoch_packed_batches(positions, 1024, 2, 3, 1)[0])
    examples, offsets, rows = first
    for start, end in zip(offsets[:-1], offsets[1:]):  # a row's examples one after the other
        assert (np.diff(rows[start:end]) >= 0).all()
    # the epoch's random order is kept up to the window of 64: an example waits at most 64 rows after it enters
    # the window (each row of up to 1024 // 142 examples), ~a window on average
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(3 * 100003)).numpy()
    turn = np.empty(len(order), dtype=np.int64)
    turn[order] = np.arange(len(order))
    displacement = np.abs(turn[examples] - np.arange(len(examples)))
    assert displacement.max() <= 64 * (1024 // positions.min()) and displacement.mean() < 2 * 64, displacement.mean()


def test_a_packed_plan_streams_rows_to_ranks_as_token_batches_do():
    plan = PackedBatches(_reasonaqa_like(300), 1024, 512, batches_per_update=4, seed=1)
    one = list(itertools.islice(plan.stream(0, DistributedContext(0, 1, 0)), 200))
    assert len({epoch for epoch, _, _ in one}) >= 3 and all(max(rows) <= 1 for _, _, rows in one)
    streams = [plan.stream(0, DistributedContext(rank, 2, rank)) for rank in range(2)]
    assert [next(streams[k % 2]) for k in range(200)] == one
    resumed = plan.stream(12, DistributedContext(0, 1, 0))
    assert [next(resumed) for _ in range(20)] == one[12:32]


def test_a_pack_length_shorter_than_an_example_names_it(tmp_path):
    with pytest.raises(BudgetTooSmallError, match=r"--train.pack_length 64 .* example at .*train.jsonl:8, which "
                                                  r"takes 97 positions.*at least 97"):
        PackedBatches(np.array([40, 41, 97, 60]), 256, 64, 1, 0, split=tmp_path / "train.jsonl",
                      line=np.array([0, 3, 7, 9]))


def test_training_packed_stops_and_resumes_bitwise(mel_store, tiny_dataset, tmp_path):
    straight = _stopped_and_resumed(mel_store, tiny_dataset, tmp_path, 2, batch_tokens=160, packing="on",
                                    pack_length=80, grad_accum=2, max_updates=6, save_every=3, log_every=1)
    rows = [row for row in read_jsonl(straight / "metrics.jsonl") if "useful_share" in row]
    assert rows and min(row["useful_share"] for row in rows) > 0.8


@pytest.mark.parametrize("overrides, message", [
    (dict(packing="on"), r"--train.packing on fills rows of positions: give --train.batch_tokens"),
    (dict(packing="on", batch_tokens=160, pack_length=200), r"--train.pack_length 200 is longer than a device batch"),
    (dict(packing="yes", batch_tokens=160), r"packing: expected one of off, on, got 'yes'"),
])
def test_bad_packing_settings_are_refused_in_one_line(mel_store, tiny_dataset, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(mel_store, tiny_dataset, tmp_path / "run", **overrides)


def test_packing_refuses_the_block_layout(mel_store, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--train.packing on needs --model.missing_audio marker"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "run", batch_tokens=160, packing="on"),
                 ModelConfig(**TINY_MODEL, missing_audio="block"))
