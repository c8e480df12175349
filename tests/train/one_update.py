"""One update's gradients through 03_train's own `accumulate_gradients`, for tests/train/test_one_objective.py.

    python one_update.py STORE DATASET OUT --weighting example|token --sizes 8,8,8,8
    torchrun --nproc_per_node=2 one_update.py ... --sizes 16     (each rank: its half of the examples)
    python one_update.py ... --batch-tokens 400 --accum 4 [--merged]
    torchrun --nproc_per_node=2 one_update.py ... --batch-tokens 400 --accum 2

The first sum(sizes) x world_size training examples are split among the ranks in order, then into micro-batches
of `sizes`. With --batch-tokens, the update is the first world_size x accum device batches that 03_train's
token-budget plan gives (seed 0), each rank taking its own; --merged puts them all in one micro-batch. Rank 0
saves {parameter name: gradient} to OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import types
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mellow import distributed
from mellow.model.modeling import build_model
from mellow.settings import ModelConfig
from mellow.store.reader import EmbeddingStore
from mellow.train.batching import TokenBatches
from mellow.train.data import ExampleSet, load_examples
from mellow.train.loop import LogWindow, accumulate_gradients
from mellow.train.throughput import FlopModel

TINY_MODEL = {"decoder": "tiny", "tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2}


def gradients(store_path: Path, dataset: Path, weighting: str, sizes: list[int] | None = None, batch_tokens: int = 0,
              accum: int = 1, merged: bool = False) -> dict[str, torch.Tensor] | None:
    """This process's part of one update: build the model (seeded), its micro-batches, accumulate; the
    gradients on rank 0 (None on the others)."""
    context, device = distributed.setup("cpu")
    store = EmbeddingStore(store_path)
    model, tokenizer = build_model(ModelConfig(**TINY_MODEL, projector_dropout=0.0, loss_weighting=weighting),
                                   store.dim, seed=0)
    examples = ExampleSet(load_examples(dataset, "train"), store, tokenizer, max_text_tokens=96)
    if batch_tokens:
        positions = model.sequence_positions(examples.lengths(), store.tokens, *examples.valid_tokens())
        plan = TokenBatches(positions, batch_tokens, accum * context.world_size, seed=0, buckets=4)
        stream = plan.stream(0, context)
        parts = [next(stream)[1] for _ in range(accum)]
        parts = [sum(parts, [])] if merged else parts
    else:
        mine = sum(sizes)
        indices = list(range(context.rank * mine, (context.rank + 1) * mine))
        parts = [indices[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    batches = iter([examples.batch(part) for part in parts])
    wrapped = DistributedDataParallel(model) if context.world_size > 1 else model
    update = types.SimpleNamespace(model=model, wrapped=wrapped, forward=wrapped, batches=batches, device=device,
                                   context=context, autocast=contextlib.nullcontext(), flops=FlopModel.of(model),
                                   scaler=torch.amp.GradScaler("cpu", enabled=False),
                                   plan=types.SimpleNamespace(micro_steps=lambda world: len(parts)))
    accumulate_gradients(update, LogWindow())
    if context.rank != 0:
        return None
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
            if parameter.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--weighting", default="example")
    parser.add_argument("--sizes", default="32")
    parser.add_argument("--batch-tokens", type=int, default=0)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--merged", action="store_true")
    args = parser.parse_args()
    found = gradients(args.store, args.dataset, args.weighting, [int(size) for size in args.sizes.split(",")],
                      args.batch_tokens, args.accum, args.merged)
    if found is not None:
        torch.save(found, args.out)


if __name__ == "__main__":
    main()
