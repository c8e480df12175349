"""Examples joined with store embeddings, tokenised once, and batched for training or generation.

Embedding rows come from a RAM cache of the whole store (read shard by shard, sequentially; the quickstart
store is ~13 MB) or are read per batch from the Zarr store (for stores larger than RAM allows), in the
DataLoader's worker processes, ahead of the training step. A store with several views (crops) per clip gives
each clip a random view per training epoch, drawn from (seed, epoch) alone so a resumed run sees the same
ones; evaluation always uses the first view.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import zarr

from mellow.manifests import check_example, json_lines
from mellow.progress import console
from mellow.store.reader import EmbeddingStore, with_view_axis
from mellow.store.shards import ShardFileError, read_with_zarr
from mellow.train.tokens import TokenizedExamples, load_split, tokenize


class RowsInMemory:
    """Every row of the store in RAM: (N, V, T, D) float16. Worker processes share it (fork, copy-on-write).
    A store with a missing or damaged shard file is refused (DamagedStoreError), never read as zeros."""

    def __init__(self, store: EmbeddingStore) -> None:
        store.check_files()
        self.embeddings, self.valid = store.load_all()

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.embeddings[rows]


class RowsFromZarr:
    """Rows read from the store's shard files when a batch needs them (mellow/store/shards.py: the same values as
    zarr, several times faster); an array laid out otherwise is read through zarr. Each process opens the files
    itself. The valid counts, (N, V) int16, are read whole up front. A missing or damaged shard file is refused
    (DamagedStoreError) when the reader opens and when a batch meets it, never read as zeros."""

    def __init__(self, store: EmbeddingStore) -> None:
        store.check_files()
        self.store = store
        self.path = store.path / "store.zarr"
        self.valid = store.load_all_valid()
        self.reader = store.row_reader()
        self._opened: tuple[int, zarr.Array] | None = None

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.reader is not None:
            try:
                return with_view_axis(self.reader.read(rows), 4)
            except ShardFileError as error:
                raise self.store.damaged(error) from None
        if self._opened is None or self._opened[0] != os.getpid():  # a forked worker opens its own
            self._opened = (os.getpid(), zarr.open_group(self.path, mode="r")["emb"])
        return with_view_axis(read_with_zarr(self._opened[1], rows), 4)


def embedding_rows(store: EmbeddingStore, cache: str, ram_limit_gb: float) -> RowsInMemory | RowsFromZarr:
    """`ram`, `stream`, or `auto`: the RAM cache if the store's rows fit in `ram_limit_gb`, else streaming."""
    if cache == "auto":
        cache = "ram" if store.rows_bytes() <= ram_limit_gb * 2**30 else "stream"
    return RowsInMemory(store) if cache == "ram" else RowsFromZarr(store)


class SplitNotFoundError(ValueError):
    """A dataset has no <split>.jsonl."""


def split_path(dataset: Path, split: str) -> Path:
    path = dataset / f"{split}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in dataset.glob("*.jsonl") if p.stem != "audio")
        raise SplitNotFoundError(f"split {split!r} not found in {dataset} (no {path.name}); available: {available}")
    return path


def load_examples(dataset: Path, split: str) -> list[dict]:
    """Every example of a split as a dict (small splits, tools); each line checked, bad ones named by line."""
    path = split_path(dataset, split)
    return [check_example(example, f"{path}:{line}") for line, example in json_lines(path)]


class ExampleSet:
    """The examples of one split whose audio is in the store, tokenised (flat arrays, see mellow/train/tokens.py),
    with a source of embedding rows. `ExampleSet.from_split` maps the split's shared on-disk cache (training,
    eval); the constructor tokenises a list of examples in memory (tests, `mellow ask`)."""

    def __init__(self, examples: list[dict], store: EmbeddingStore, tokenizer, max_text_tokens: int,
                 rows: RowsInMemory | RowsFromZarr | None = None, seed: int = 0, prompt_suffix: str = "\n",
                 tokenized: TokenizedExamples | None = None, source: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        if tokenized is None:
            tokenized = tokenize(enumerate(examples), store.rows.lookup, tokenizer, max_text_tokens, prompt_suffix)
            self._examples: list[dict] | None = [examples[line] for line in tokenized.line]
        else:
            self._examples = None  # read from `source` only if asked for (validation accuracy, eval)
        self.tokenized, self.source = tokenized, source
        if tokenized.skipped:
            console.print(f"[yellow]skipping {tokenized.skipped} example(s) whose audio failed "
                          f"to encode or is not in the store")
        self.rows = rows or RowsInMemory(store)
        self.valid = torch.from_numpy(self.rows.valid.astype("int64"))  # (N, V) valid tokens
        self.view_counts = (self.valid > 0).sum(dim=1).clamp(min=1)  # (N,) views each clip has
        self._views: tuple[int | None, torch.Tensor] = (None, torch.zeros(len(self.valid), dtype=torch.long))
        self.loss_weights: np.ndarray | None = None  # (n,) per-example loss weights (--train.balance loss)

    @classmethod
    def from_split(cls, dataset: Path, split: str, store: EmbeddingStore, tokenizer, max_text_tokens: int,
                   rows: RowsInMemory | RowsFromZarr | None = None, seed: int = 0, prompt_suffix: str = "\n",
                   split_sha256: str | None = None, limit: int = 0) -> ExampleSet:
        """The split's examples from its tokenised cache (built once, shared by every process); `limit` > 0 keeps
        the first `limit` of them."""
        source = split_path(dataset, split)
        tokenized = load_split(dataset, split, store, tokenizer, max_text_tokens, prompt_suffix, split_sha256)
        if limit:
            tokenized = tokenized.first(limit)
        return cls([], store, tokenizer, max_text_tokens, rows, seed, prompt_suffix, tokenized, source)

    def __len__(self) -> int:
        return len(self.tokenized)

    @property
    def examples(self) -> list[dict]:
        """The example records (dicts) in this set's order; read from the split file the first time (kept out of
        the training data path: only validation accuracy and eval need them)."""
        if self._examples is None:
            self._examples = [example for _, example in self._read_examples()]
        return self._examples

    def _read_examples(self) -> Iterator[tuple[int, dict]]:
        """(position in this set, example) of each of this set's examples, in one pass over the split file."""
        if self._examples is not None:
            yield from enumerate(self._examples)
            return
        wanted = self.tokenized.line  # the split's line numbers, ascending (the cache keeps the file's order)
        position = 0
        for number, (_, example) in enumerate(json_lines(self.source)):
            if position < len(wanted) and wanted[position] == number:
                yield position, example
                position += 1
        assert position == len(wanted), f"{self.source}: {len(wanted) - position} cached examples not found"

    def lengths(self) -> np.ndarray:
        """(n,) prompt + answer tokens of every example."""
        return self.tokenized.lengths()

    def valid_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(n,) valid audio tokens of every example's first clip and (n,) of its second (-1: none), the most any
        view of the clip has: what a token-budget plan counts, from the valid counts read up front."""
        most = np.asarray(self.rows.valid).max(axis=1).astype(np.int64)  # (N,) per store row
        row2 = np.asarray(self.tokenized.row2)
        return most[np.asarray(self.tokenized.row1)], np.where(row2 >= 0, most[np.maximum(row2, 0)], -1)

    def class_weights(self, label_tasks: dict[str, list[str]]) -> np.ndarray:
        """(n,) weights that give every class of each closed-label task the same total while the task keeps its
        share: a labelled example weighs (the task's examples / its classes) / its class's examples, any other
        1. The split is streamed for (task, answer) alone: an example keeps a class number, not an object."""
        class_of = np.full(len(self), -1, dtype=np.int64)  # (n,) each example's class number; -1: no label task
        classes: dict[tuple[str, str], int] = {}  # (task, label) -> class number
        for position, example in self._read_examples():
            if example["task"] in label_tasks:
                class_of[position] = classes.setdefault((example["task"], example["answer"]), len(classes))
        if not classes:
            return np.ones(len(self))
        per_class = np.bincount(class_of[class_of >= 0], minlength=len(classes))  # (C,)
        task_examples, task_classes = Counter(), Counter()
        for (task, _), number in classes.items():
            task_examples[task] += int(per_class[number])
            task_classes[task] += 1
        class_weight = np.array([task_examples[task] / task_classes[task] / per_class[number]
                                 for (task, _), number in classes.items()])  # (C,)
        return np.where(class_of >= 0, class_weight[np.maximum(class_of, 0)], 1.0)

    def prompt_ids(self, index: int) -> list[int]:
        return self.tokenized.prompt(index).tolist()

    def answer_ids(self, index: int) -> list[int]:
        return self.tokenized.answer(index).tolist()

    def views_of_epoch(self, epoch: int | None) -> torch.Tensor:
        """The view of every clip (N,) used in training epoch `epoch`; the first view for epoch None."""
        if epoch is None or self.valid.shape[1] == 1:
            return torch.zeros(len(self.valid), dtype=torch.long)
        if self._views[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._views = (epoch, (torch.rand(len(self.valid), generator=generator) * self.view_counts).long())
        return self._views[1]

    def _audio(self, rows: np.ndarray, epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.maximum(rows, 0))
        views = self.views_of_epoch(epoch)[index]
        unique, position = np.unique(index.numpy(), return_inverse=True)  # each row read once
        embeddings = torch.from_numpy(self.rows.read(unique))[torch.from_numpy(position), views]
        return embeddings.float(), self.valid[index, views]  # (B, T, D), (B,)

    def batch(self, indices: list[int], for_generation: bool = False, epoch: int | None = None,
              rows: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Tensors for `indices`. Training: prompt+answer right-padded, labels on the answer, audio views of
        `epoch`; with `rows` (a packed plan), the row each example shares with others (`row`). Generation: prompt
        only, left-padded so every row ends where decoding starts."""
        selected = np.asarray(indices, dtype=np.int64)
        audio1, valid1 = self._audio(self.tokenized.row1[selected], epoch)
        row2 = np.asarray(self.tokenized.row2[selected])
        audio2, valid2 = self._audio(row2, epoch)
        prompts = [self.tokenized.prompt(i) for i in selected]
        answers = [self.tokenized.answer(i) for i in selected]
        texts = prompts if for_generation else [np.concatenate([p, a]) for p, a in zip(prompts, answers)]
        width = max(len(text) for text in texts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(selected), width), pad, dtype=torch.long)
        text_mask = torch.zeros((len(selected), width), dtype=torch.long)
        labels = torch.full((len(selected), width), -100, dtype=torch.long)
        for row, (prompt, text) in enumerate(zip(prompts, texts)):
            start = width - len(text) if for_generation else 0
            input_ids[row, start : start + len(text)] = torch.from_numpy(text.astype(np.int64))
            text_mask[row, start : start + len(text)] = 1
            if not for_generation:
                labels[row, len(prompt) : len(text)] = torch.from_numpy(text[len(prompt) :].astype(np.int64))
        batch = {"audio1": audio1, "audio1_valid": valid1, "audio2": audio2, "audio2_valid": valid2,
                 "has_audio2": torch.from_numpy(row2 >= 0), "input_ids": input_ids,
                 "text_mask": text_mask, "labels": labels}
        if self.loss_weights is not None and not for_generation:
            batch["loss_weight"] = torch.from_numpy(self.loss_weights[selected]).float()  # (B,)
        if rows is not None:
            batch["row"] = torch.tensor(rows, dtype=torch.long)  # (B,)
        return batch


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class MicroBatches(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole micro-batches: (epoch, example indices[, rows]) -> batch tensors,
    so a DataLoader builds them in worker processes in exactly the order the sampler gives."""

    def __init__(self, examples: ExampleSet) -> None:
        self.examples = examples

    def __getitem__(self, key: tuple) -> dict[str, torch.Tensor]:
        return batch_of(self.examples, key)


def batch_of(examples: ExampleSet, key: tuple) -> dict[str, torch.Tensor]:
    """The training batch of a plan's item: (epoch, example indices) or (epoch, example indices, rows)."""
    epoch, indices, *rows = key
    return examples.batch(indices, epoch=epoch, rows=rows[0] if rows else None)


def _ignore_stop_signals(worker_id: int) -> None:
    """SLURM and torchrun send SIGTERM to every process of a job, and a terminal's Ctrl-C reaches every process
    of its foreground group; a worker that died of it would take the training process down with it ("DataLoader
    worker exited unexpectedly") before it could save. The training process decides when to stop and ends its
    workers itself (a worker also exits when its parent dies)."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


@contextmanager
def workers_ended(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Yield `batches` and end its worker processes on the way out, also on an exception: a traceback that is
    kept (by a caller, a test runner) would keep the loader and its workers alive, and at exit multiprocessing
    ends them with SIGTERM, which they ignore (_ignore_stop_signals), so the process would never exit."""
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's DataLoader iterator; a generator has none
        if shutdown is not None:
            shutdown()


def batch_loader(examples: ExampleSet, order: Iterator[tuple], workers: int, prefetch: int,
                 pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in `order`, built by `workers` processes up to `prefetch` batches each ahead of the training
    step (0 workers: built in this process when asked for)."""
    if workers == 0:
        return (batch_of(examples, key) for key in order)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after tokenising; they never tokenise
    # Its own generator: the loader draws a seed for its workers from it, and a draw from the global generator
    # would shift the training's random stream (dropout), so a resumed run would no longer match.
    loader = torch.utils.data.DataLoader(MicroBatches(examples), sampler=order, batch_size=None, num_workers=workers,
                                         prefetch_factor=prefetch, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(0),
                                         worker_init_fn=_ignore_stop_signals)
    return iter(loader)

