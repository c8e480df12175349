"""The training data path: a RAM cache of the store, or rows streamed from Zarr by worker processes, give the
same batches and the same training numbers."""

from __future__ import annotations

import pytest
import torch

from mellow.config import from_names
from mellow.distributed import DistributedContext
from mellow.files import read_jsonl
from mellow.model.decoders import load_tokenizer
from mellow.settings import ModelConfig, TrainConfig
from mellow.store.reader import EmbeddingStore
from mellow.train import loop
from mellow.train.batching import FixedBatches
from mellow.train.data import ExampleSet, RowsFromZarr, RowsInMemory, batch_loader, embedding_rows, load_examples

from conftest import TINY_MODEL


def test_streamed_rows_in_workers_equal_the_ram_cache(mel_store, tiny_dataset):
    store = EmbeddingStore(mel_store)
    tokenizer = load_tokenizer("tiny")
    examples = load_examples(tiny_dataset, "train")
    in_memory = ExampleSet(examples, store, tokenizer, 64, rows=RowsInMemory(store), seed=1)
    streamed = ExampleSet(examples, store, tokenizer, 64, rows=RowsFromZarr(store), seed=1)
    lengths = in_memory.lengths()

    def order():
        return FixedBatches(lengths, 8, 1, seed=1, bucket=1).stream(3, DistributedContext(0, 1, 0))

    direct = batch_loader(in_memory, order(), workers=0, prefetch=1, pin_memory=False)
    workers = batch_loader(streamed, order(), workers=2, prefetch=2, pin_memory=False)
    for _ in range(30):  # 23 batches an epoch: crosses into the next
        a, b = next(direct), next(workers)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert isinstance(embedding_rows(store, "auto", ram_limit_gb=1.0), RowsInMemory)
    assert isinstance(embedding_rows(store, "auto", ram_limit_gb=1e-9), RowsFromZarr)


@pytest.mark.parametrize("cache,workers", [("stream", 2), ("ram", 0)])
def test_training_numbers_do_not_depend_on_the_data_path(mel_store, tiny_dataset, tmp_path, cache, workers):
    def losses(run_dir, **extra):
        loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=6,
                            batch_size=4,
                              val_every=3, log_every=1, **extra), ModelConfig(**TINY_MODEL))
        return [row.get("loss", row.get("val_loss")) for row in read_jsonl(run_dir / "metrics.jsonl")]

    reference = losses(tmp_path / "default")  # ram cache, 2 workers
    assert losses(tmp_path / cache, data_cache=cache, data_workers=workers) == reference
    rows = [row for row in read_jsonl(tmp_path / cache / "metrics.jsonl") if "data_wait" in row]
    assert rows and all(0.0 <= row["data_wait"] < 1.0 for row in rows)
