"""The order of training examples, as batches: a pure function of (seed, epoch), planned from the token cache's
lengths alone (nothing is read from the store), so that every rank plans the same epoch and a resumed run
continues exactly where it stopped.

Two plans:

- `--train.batch_size B` (FixedBatches): each update is B examples, cut into grad_accum global micro-batches of
  B / grad_accum, each shared out among the ranks. The unit of the run's position is a global micro-batch.
- `--train.batch_tokens N` (TokenBatches): each device batch holds as many examples as fit in N positions (audio +
  text, padding included: rows x the longest row). Examples are grouped into length buckets (quantiles of the
  split's lengths, as lhotse's and NeMo's bucketing samplers do), taken in a random order within each bucket and
  cut greedily; the device batches of the whole epoch are then shuffled, so the order is random at the batch
  level while a batch holds similar lengths. An update is world_size x grad_accum device batches, each rank taking
  every world_size-th: every rank computes at most N positions per micro-batch. The unit of the run's position is a
  device batch, so a resume on another world size continues the same sequence of batches.

- `--train.packing on` (PackedBatches): the same budget, but examples share rows of `pack_length` positions, one
  after the other (mellow/model/modeling.py keeps attention within each). Rows are filled best-fit from a window
  of the epoch's random order: each row starts with the example that has waited longest and is topped up with the
  longest waiting examples that still fit, so a row is all but full and no example waits long; a device batch is
  batch_tokens // pack_length consecutive rows. Updates and ranks as for token batches.

Every epoch of a token or packed plan holds every example once (a sampler-balanced epoch: as many draws, with
replacement).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mellow.distributed import DistributedContext


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def _epoch_examples(count: int, generator: torch.Generator, weights: np.ndarray | None) -> np.ndarray:
    """The examples of one epoch in a random order: a permutation, or with `weights` (--train.balance sampler) as
    many draws with replacement, each with a probability proportional to its weight."""
    if weights is None:
        return torch.randperm(count, generator=generator).numpy()
    return torch.multinomial(torch.from_numpy(weights), count, replacement=True, generator=generator).numpy()


def epoch_micro_batches(lengths: np.ndarray, micro_batch: int, seed: int, epoch: int, bucket: int,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """The global micro-batches of one epoch, (batches, micro_batch) example indices, a pure function of
    (seed, epoch). An array, not lists: at a million examples the epoch's order must not be a million objects.
    With `weights` (--train.balance sampler) the epoch draws as many examples, with replacement, each with a
    probability proportional to its weight.

    With `bucket` > 1, each run of `bucket` micro-batches of a random permutation is sorted by text length
    before it is cut, and the cut micro-batches are shuffled again: batches hold similar lengths, so far less
    padding is computed, while the epoch stays a random order.
    """
    generator = _generator(seed, epoch)
    order = _epoch_examples(len(lengths), generator, weights)
    per_epoch = len(lengths) // micro_batch
    order = order[: per_epoch * micro_batch]
    if bucket <= 1:
        return order.reshape(per_epoch, micro_batch)
    lengths = np.asarray(lengths)
    batches = []
    span = micro_batch * bucket
    for start in range(0, len(order), span):
        group = order[start : start + span]
        group = group[np.argsort(lengths[group], kind="stable")]
        cut = group.reshape(-1, micro_batch)
        batches.append(cut[torch.randperm(len(cut), generator=generator).numpy()])
    return np.concatenate(batches)


def cut_to_budget(positions: np.ndarray, budget: int) -> np.ndarray:
    """Where to cut a sequence of examples (their positions, in order) into consecutive batches, each as long as
    its rows x its longest row stays within `budget`: (batches + 1,) offsets. Every example must fit alone."""
    cuts = [0]
    most_rows = budget // max(int(positions.min()), 1) if len(positions) else 0
    start = 0
    while start < len(positions):
        window = positions[start : start + most_rows]
        fits = np.arange(1, len(window) + 1) * np.maximum.accumulate(window) <= budget
        rows = len(window) if fits.all() else int(np.argmin(fits))  # the first that no longer fits
        start += rows
        cuts.append(start)
    return np.asarray(cuts, dtype=np.int64)


def bucket_of(positions: np.ndarray, buckets: int) -> np.ndarray:
    """(n,) the length bucket of every example: `buckets` quantiles of the split's positions."""
    bounds = np.quantile(positions, np.linspace(0, 1, buckets + 1)[1:-1]) if buckets > 1 else np.array([])
    return np.searchsorted(bounds, positions, side="right")


def epoch_token_batches(positions: np.ndarray, budget: int, seed: int, epoch: int, buckets: np.ndarray,
                        weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The device batches of one epoch under a token budget, a pure function of (seed, epoch): (examples in
    batch order (n,), offsets (batches + 1,)); batch k is examples[offsets[k]:offsets[k + 1]]. `buckets` is
    every example's length bucket (`bucket_of`). Flat arrays: ~30 k batches of a million examples stay two arrays."""
    generator = _generator(seed, epoch)
    order = _epoch_examples(len(positions), generator, weights)
    grouped = order[np.argsort(buckets[order], kind="stable")]  # by bucket; random order within each
    bounds = np.searchsorted(buckets[grouped], np.arange(buckets.max() + 2))  # where each bucket starts
    sizes = np.concatenate([np.diff(cut_to_budget(positions[grouped[start:end]], budget))
                            for start, end in zip(bounds[:-1], bounds[1:]) if end > start])  # (batches,)
    shuffled = torch.randperm(len(sizes), generator=generator).numpy()  # batch k of the epoch is shuffled[k]
    place = np.empty_like(shuffled)
    place[shuffled] = np.arange(len(shuffled))  # where each batch goes
    batch_of = np.repeat(np.arange(len(sizes)), sizes)  # (n,) the batch of each grouped example
    examples = grouped[np.argsort(place[batch_of], kind="stable")]
    offsets = np.concatenate([[0], np.cumsum(sizes[shuffled])])
    return examples, offsets


def epoch_packed_batches(positions: np.ndarray, row_length: int, rows_per_batch: int, seed: int, epoch: int,
                         weights: np.ndarray | None = None,
                         window: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device batches of one packed epoch, a pure function of (seed, epoch): (examples in batch order (n,),
    offsets (batches + 1,), the row of each example within its batch (n,)); the examples of a row are consecutive.
    Rows of at most `row_length` positions are filled best-fit from a `window` of the epoch's random order (see the
    module docstring); every example must fit a row alone."""
    order = _epoch_examples(len(positions), _generator(seed, epoch), weights)
    lengths = np.asarray(positions, dtype=np.int64)[order].tolist()
    count, low = len(order), (1 << 32) - 1
    pool: list[int] = []  # waiting examples, sorted: key = length << 32 | place in the order
    waiting: deque[int] = deque()  # the same keys, oldest first (some already taken)
    taken = bytearray(count)
    arrived = 0
    row_sizes: list[int] = []
    placed: list[int] = []  # places in the order, row by row

    def take(index: int) -> int:
        key = pool.pop(index)
        taken[key & low] = 1
        placed.append(key & low)
        return key >> 32

    while True:
        while len(pool) < window and arrived < count:
            key = lengths[arrived] << 32 | arrived
            insort(pool, key)
            waiting.append(key)
            arrived += 1
        while waiting and taken[waiting[0] & low]:
            waiting.popleft()
        if not waiting:
            break
        first = waiting.popleft()
        room = row_length - take(bisect_left(pool, first))
        size = 1
        while pool:
            fitting = bisect_right(pool, room << 32 | low) - 1  # the longest that fits
            if fitting < 0:
                break
            room -= take(fitting)
            size += 1
            if arrived < count:  # keep the window full
                key = lengths[arrived] << 32 | arrived
                insort(pool, key)
                waiting.append(key)
                arrived += 1
        row_sizes.append(size)
    sizes = np.asarray(row_sizes, dtype=np.int64)  # (rows,)
    row_number = np.repeat(np.arange(len(sizes)), sizes)  # (n,) the epoch's row of each placed example
    ends = np.concatenate([np.cumsum(sizes)[rows_per_batch - 1 :: rows_per_batch], [len(placed)]])
    offsets = np.unique(np.concatenate([[0], ends]))
    return order[np.asarray(placed, dtype=np.int64)], offsets, row_number % rows_per_batch


def _where(example: int, split: Path | None, line: np.ndarray | None) -> str:
    """How an error names an example: its split file and line, else its number."""
    return f"{split}:{int(line[example]) + 1}" if split is not None and line is not None else f"#{example}"


class BudgetTooSmallError(ValueError):
    """--train.batch_tokens is smaller than an example."""


class FixedBatches:
    """--train.batch_size: updates of `batch_size` examples, grad_accum global micro-batches each."""

    def __init__(self, lengths: np.ndarray, batch_size: int, grad_accum: int, seed: int, bucket: int,
                 weights: np.ndarray | None = None) -> None:
        self.lengths, self.seed, self.bucket, self.weights = lengths, seed, bucket, weights
        self.grad_accum = grad_accum
        self.micro_batch = batch_size // grad_accum
        self.per_epoch = len(lengths) // self.micro_batch
        if self.per_epoch == 0:
            raise ValueError(f"the training split has {len(lengths)} examples, fewer than one micro-batch "
                             f"({self.micro_batch}); lower --train.batch_size")

    def per_update(self, world_size: int) -> int:
        """How far one update moves the run's position (global micro-batches)."""
        return self.grad_accum

    def micro_steps(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per update."""
        return self.grad_accum

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, batch within it) of the run's position."""
        return divmod(position, self.per_epoch)

    def epochs_at(self, position: int) -> float:
        """The epochs the run's position has gone through (1.5: half way through the second)."""
        return position / self.per_epoch

    def stream(self, start: int, context: DistributedContext) -> Iterator[tuple[int, list[int]]]:
        """(epoch, this rank's example indices) of every global micro-batch from number `start` on, forever."""
        epoch, offset = self.locate(start)
        while True:
            for batch in epoch_micro_batches(self.lengths, self.micro_batch, self.seed, epoch, self.bucket,
                                             self.weights)[offset:]:
                yield epoch, batch[context.rank :: context.world_size].tolist()
            epoch, offset = epoch + 1, 0


class TokenBatches:
    """--train.batch_tokens: device batches of at most `budget` positions, `batches_per_update` of them per update
    (the run's first world size x grad_accum: a resume on another world size keeps every update's batches, each
    rank accumulating batches_per_update / world_size); see the module docstring."""

    def __init__(self, positions: np.ndarray, budget: int, batches_per_update: int, seed: int, buckets: int,
                 weights: np.ndarray | None = None, split: Path | None = None,
                 line: np.ndarray | None = None) -> None:
        self.positions, self.budget, self.batches_per_update, self.seed = positions, budget, batches_per_update, seed
        self.weights = weights
        if len(positions) == 0:
            raise ValueError("the training split has no examples")
        longest = int(np.argmax(positions))
        if positions[longest] > budget:
            raise BudgetTooSmallError(
                f"--train.batch_tokens {budget} is smaller than the example at {_where(longest, split, line)}, "
                f"which takes {int(positions[longest])} positions (audio and text); raise --train.batch_tokens to at "
                f"least {int(positions[longest])}, or lower --train.max_text_tokens")
        self.buckets = bucket_of(positions, buckets)
        self._counts: dict[int, int] = {}
        self._planned: tuple[int, tuple[np.ndarray, ...]] | None = None  # the last epoch planned

    def per_update(self, world_size: int) -> int:
        """How far one update moves the run's position (device batches)."""
        return self.batches_per_update

    def micro_steps(self, world_size: int) -> int:
        """Device batches each rank accumulates per update."""
        if self.batches_per_update % world_size:
            raise ValueError(f"this run's updates are {self.batches_per_update} device batches each (--train."
                             f"batch_tokens: its first world size x --train.grad_accum), which {world_size} "
                             "processes cannot share evenly; continue it on a number of processes that divides "
                             f"{self.batches_per_update}")
        return self.batches_per_update // world_size

    def plan(self, epoch: int) -> tuple[np.ndarray, ...]:
        """(examples, offsets) of `epoch`, planned (epoch_token_batches)."""
        return epoch_token_batches(self.positions, self.budget, self.seed, epoch, self.buckets, self.weights)

    def epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        """The plan of `epoch` (examples, offsets, ...); the last one planned is kept, so that counting an epoch's
        batches and then streaming it plans it once."""
        if self._planned is None or self._planned[0] != epoch:
            planned = self.plan(epoch)
            self._planned = (epoch, planned)
            self._counts[epoch] = len(planned[1]) - 1
        return self._planned[1]

    def batches_in(self, epoch: int) -> int:
        if epoch not in self._counts:
            self.epoch(epoch)
        return self._counts[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, batch within it) of the run's position: epochs differ in their number of batches, so the
        ones before are planned again to count them (a fraction of a second each at a million examples)."""
        epoch = 0
        while position >= self.batches_in(epoch):
            position -= self.batches_in(epoch)
            epoch += 1
        return epoch, position

    def epochs_at(self, position: int) -> float:
        """The epochs the run's position has gone through (1.5: half way through the second)."""
        epoch, batch = self.locate(position)
        return epoch + batch / self.batches_in(epoch)

    def item(self, epoch: int, planned: tuple[np.ndarray, ...], batch: int) -> tuple:
        """What the data loader gets for device batch `batch` of `epoch`: (epoch, example indices)."""
        examples, offsets = planned[:2]
        return epoch, examples[offsets[batch] : offsets[batch + 1]].tolist()

    def stream(self, start: int, context: DistributedContext) -> Iterator[tuple]:
        """(epoch, example indices[, rows]) of this rank's device batches: numbers start + rank, + world_size,
        ..., forever (the sequence of batches runs on across epochs)."""
        epoch, offset = self.locate(start + context.rank)
        while True:
            planned = self.epoch(epoch)
            count = len(planned[1]) - 1
            while offset < count:
                yield self.item(epoch, planned, offset)
                offset += context.world_size
            epoch, offset = epoch + 1, offset - count
            while offset >= self.batches_in(epoch):  # an epoch of fewer batches than ranks
                offset -= self.batches_in(epoch)
                epoch += 1


class PackedBatches(TokenBatches):
    """--train.packing on: device batches of `budget` // `row_length` rows, each row several examples one after
    the other (epoch_packed_batches); updates and ranks as TokenBatches."""

    def __init__(self, positions: np.ndarray, budget: int, row_length: int, batches_per_update: int, seed: int,
                 weights: np.ndarray | None = None, split: Path | None = None,
                 line: np.ndarray | None = None) -> None:
        row_length = row_length or budget
        if len(positions) and positions.max() > row_length:
            longest = int(np.argmax(positions))
            raise BudgetTooSmallError(
                f"--train.pack_length {row_length} is shorter than the example at {_where(longest, split, line)}, "
                "which takes "
                f"{int(positions[longest])} positions (audio and text); raise --train.pack_length to at least "
                f"{int(positions[longest])}, or lower --train.max_text_tokens")
        super().__init__(positions, budget, batches_per_update, seed, 1, weights, split, line)
        self.row_length, self.rows_per_batch = row_length, budget // row_length

    def plan(self, epoch: int) -> tuple[np.ndarray, ...]:
        """(examples, offsets, rows) of `epoch` (epoch_packed_batches)."""
        return epoch_packed_batches(self.positions, self.row_length, self.rows_per_batch, self.seed, epoch,
                                    self.weights)

    def item(self, epoch: int, planned: tuple[np.ndarray, ...], batch: int) -> tuple:
        """(epoch, example indices, the row of each within the batch)."""
        examples, offsets, rows = planned
        start, end = offsets[batch], offsets[batch + 1]
        return epoch, examples[start:end].tolist(), rows[start:end].tolist()
