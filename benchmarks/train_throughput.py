"""Training throughput from the store vs. with the frozen encoder run on raw audio in the loop, in one run; or,
with --batching, how much of the computed positions each way of batching makes useful.

    uv run python benchmarks/train_throughput.py                                   # the quickstart's model
    uv run python benchmarks/train_throughput.py --decoder smollm2-135m --decoder-mode lora --updates 12
    uv run python benchmarks/train_throughput.py --batching random,tokens \
        --dataset datasets/synth --store shards/synth/whisper-tiny-6s-16tok-<hash>     # a quickstart's split

Prints, for the same model, batches and optimizer: samples/s of mellow's training loop reading the store
(RAM cache, and rows streamed from Zarr by the data workers), with the fraction of step time spent waiting
for data; samples/s of a loop that decodes each batch's clips with ffmpeg (a thread pool, as 01_precompute
does) and runs the whisper-tiny encoder on them before every step (what mellow replaces); and the ratio.

With --batching, mellow's own loop (03_train, RAM cache) trains the quickstart's model on two splits: the given
quickstart split (or one made here) and a ReasonAQA-shaped synthetic split over the same clips (answers of 1-160
words, prompts of 5-30, a second audio in 40% of examples, a store of 64 audio tokens per clip). For each
batching — `random` (batches of --batch-size examples in a random order), `tokens` (--train.batch_tokens,
a budget of --batch-size x the split's mean positions) and `packed` (the same budget with --train.packing on, in
one row per batch; `packed:L` in rows of L positions, or of the split's longest example if longer) — it prints
the useful share of the computed positions
and useful tokens/s over the measured updates, against the baseline measured in the same run: random batches
in the padded block layout (--model.missing_audio block), what 03_train computed before token budgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mellow.audio.views import decode_views
from mellow.config import from_names
from mellow.distributed import DistributedContext
from mellow.encode import precompute
from mellow.encode.encoders import build_encoder
from mellow.files import read_jsonl
from mellow.model.modeling import build_model
from mellow.settings import EncoderConfig, ModelConfig, PrecomputeConfig, TrainConfig
from mellow.sources import prepare
from mellow.sources.config import PrepareConfig
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreConfig
from mellow.train import loop
from mellow.train.batching import FixedBatches
from mellow.train.data import ExampleSet, load_examples
from mellow.train.loop import _optimizer, mixed_precision, training_precision


def from_store(store: Path, dataset: Path, run_dir: Path, model: ModelConfig, args: argparse.Namespace,
               cache: str) -> tuple[float, float]:
    """(samples/s, data-wait fraction) of mellow's own training loop over the measured updates."""
    loop.run(from_names(TrainConfig, store=store, dataset=dataset, run_dir=run_dir, batch_size=args.batch_size,
                          max_updates=args.warmup + args.updates, log_every=1, val_every=0, save_every=0,
                          data_cache=cache, data_workers=args.data_workers, tensorboard=False, wandb="off",
                          lr=1e-4, warmup_updates=1, compile=args.compile, precision=args.precision), model)
    rows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row][args.warmup:]
    seconds = rows[-1]["time"] - rows[0]["time"]
    # log_every 1: each row's data_wait is a fraction of the time since the previous row
    waited = sum(row["data_wait"] * (row["time"] - previous["time"]) for previous, row in zip(rows, rows[1:]))
    return (len(rows) - 1) * args.batch_size / seconds, waited / seconds


def raw_audio_loop(store_path: Path, dataset: Path, model_config: ModelConfig,
                   args: argparse.Namespace) -> tuple[float, str]:
    """(samples/s when every batch's audio is decoded and encoded inside the loop, the precision it ran in)."""
    store = EmbeddingStore(store_path)
    model, tokenizer = build_model(model_config, store.dim, seed=0)
    precision = training_precision(model, args.precision, torch.device("cpu"))  # as 03_train sets it up
    examples = ExampleSet(load_examples(dataset, "train"), store, tokenizer, 96, seed=0)
    optimizer = _optimizer(model, from_names(TrainConfig, lr=1e-4))
    encoder = build_encoder(EncoderConfig(name="whisper-tiny", tokens=16))
    config = PrecomputeConfig(dataset=dataset, encoder=encoder.config)
    records = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    clip_of_row = {r["row"]: r["id"] for r in store.index}
    lengths = examples.lengths()
    row1, row2 = examples.tokenized.row1, examples.tokenized.row2
    order = FixedBatches(lengths, args.batch_size, 1, 0, 1).stream(0, DistributedContext(0, 1, 0))
    model.train()
    forward = torch.compile(model, dynamic=True) if args.compile else model
    with ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
        for update in range(args.warmup + args.updates):
            if update == args.warmup:
                started = time.perf_counter()
            epoch, indices = next(order)
            batch = examples.batch(indices, epoch=epoch)  # text; its audio is replaced below
            rows = sorted({int(row) for i in indices for row in (row1[i], row2[i]) if row >= 0})
            decoded = pool.map(lambda row: decode_views(
                records[clip_of_row[row]], str(dataset / records[clip_of_row[row]]["path"]), config.encoder,
                config.min_seconds, encoder.sample_rate)[0], rows)
            waves, fractions = zip(*decoded)
            embeddings, valid = encoder.encode(np.stack(waves), np.array(fractions))
            position = {row: n for n, row in enumerate(rows)}
            for slot, slot_rows in (("audio1", row1), ("audio2", row2)):
                picked = [position.get(int(slot_rows[i]), 0) for i in indices]
                batch[slot] = torch.from_numpy(embeddings[picked]).float()
                batch[f"{slot}_valid"] = torch.from_numpy(valid[picked].astype("int64"))
            with mixed_precision(precision, torch.device("cpu")):
                loss = forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return args.updates * args.batch_size / (time.perf_counter() - started), precision


BATCHINGS = ("random", "tokens", "packed", "packed:L")


def reasonaqa_shaped(quickstart: Path, folder: Path, examples: int, seed: int = 0) -> Path:
    """A dataset over the quickstart dataset's clips with ReasonAQA's shapes: prompts of 5-30 words, answers of
    1-160, a second audio in 40% of the examples."""
    folder.mkdir(parents=True)
    for name in ("audio.jsonl", "prepare.json"):
        shutil.copy(quickstart / name, folder / name)
    (folder / "audio").symlink_to((quickstart / "audio").resolve())
    clips = [record["id"] for record in read_jsonl(quickstart / "audio.jsonl")]
    generator = np.random.default_rng(seed)
    words = "the a sound of high low tone chord noise burst chirp clicks silence first second louder".split()
    for split, count in (("train", examples), ("val", 64)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                two = generator.random() < 0.4
                pair = generator.choice(clips, 2, replace=False)
                handle.write(json.dumps({
                    "task": "reasoning", "audio1": str(pair[0]), "audio2": str(pair[1]) if two else None,
                    "prompt": " ".join(generator.choice(words, generator.integers(5, 31))) + "?",
                    "answer": " ".join(generator.choice(words, generator.integers(1, 161)))}) + "\n")
    return folder


def measured_batching(store: Path, dataset: Path, run_dir: Path, model: ModelConfig, args: argparse.Namespace,
                      batch_tokens: int, pack_length: int | None) -> tuple[float, float, float]:
    """(useful share, useful tokens/s, samples/s) of 03_train's loop over the measured updates (after warmup);
    `pack_length` None: no packing."""
    packing = dict(packing="on", pack_length=pack_length) if pack_length is not None else {}
    loop.run(from_names(TrainConfig, store=store, dataset=dataset, run_dir=run_dir, batch_size=args.batch_size,
                        batch_tokens=batch_tokens, **packing, max_updates=args.warmup + args.updates, log_every=1,
                        val_every=0, save_every=0, data_cache="ram", data_workers=args.data_workers, tensorboard=False,
                        wandb="off", lr=1e-4, warmup_updates=1, precision=args.precision), model)
    rows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row][args.warmup:]
    seconds = [row["time"] - previous["time"] for previous, row in zip(rows, rows[1:])]
    useful = sum(row["useful_tokens_per_s"] * dt for row, dt in zip(rows[1:], seconds))
    computed = sum(row["tokens_per_s"] * dt for row, dt in zip(rows[1:], seconds))
    examples = sum(row["samples_per_s"] * dt for row, dt in zip(rows[1:], seconds))
    return useful / computed, useful / sum(seconds), examples / sum(seconds)


def split_positions(store: Path, dataset: Path, model_config: ModelConfig) -> np.ndarray:
    """The positions of the split's training examples in the model's layout."""
    opened = EmbeddingStore(store)
    model, tokenizer = build_model(model_config, opened.dim, seed=0)
    examples = ExampleSet.from_split(dataset, "train", opened, tokenizer, 256, prompt_suffix=model.prompt_suffix)
    return model.sequence_positions(examples.lengths(), opened.tokens, *examples.valid_tokens())


def compare_batchings(args: argparse.Namespace, work: Path) -> None:
    """The --batching comparison (see the module docstring)."""
    shape = dict(tiny_hidden=192, tiny_layers=4, tiny_heads=4) if args.decoder == "tiny" else {}
    model = ModelConfig(decoder=args.decoder, decoder_mode=args.decoder_mode, **shape)
    if args.dataset is None:
        args.dataset = prepare.run(PrepareConfig(root=work / "datasets", num_clips=800))
        args.store = precompute.run(PrecomputeConfig(dataset=args.dataset, encoder=EncoderConfig(
            name="whisper-tiny", tokens=16), store=StoreConfig(root=work / "shards"))).store_path
    shaped = reasonaqa_shaped(args.dataset, work / "reasonaqa", args.reasonaqa_examples)
    shaped_store = precompute.run(PrecomputeConfig(dataset=shaped, encoder=EncoderConfig(
        name="whisper-tiny", tokens=64), store=StoreConfig(root=work / "shards"))).store_path
    figures = []
    for name, dataset, store in (("quickstart", args.dataset, args.store), ("ReasonAQA-shaped", shaped, shaped_store)):
        positions = split_positions(store, dataset, model)
        budget = int(np.ceil(args.batch_size * positions.mean() / 64) * 64)
        runs = [("random, block layout (before)", dataclasses.replace(model, missing_audio="block"), 0, None)]
        for batching in args.batching:
            kind, _, length = batching.partition(":")
            if kind == "random":
                runs.append(("random", model, 0, None))
            elif kind == "tokens":
                runs.append((f"tokens ({budget} positions)", model, budget, None))
            else:
                length = max(int(length), int(np.ceil(positions.max() / 64) * 64)) if length else 0  # >= the longest
                rows = f"rows of {length}" if length else "one row"
                runs.append((f"packed ({budget} positions, {rows})", model, budget, length))
        for repeat in range(args.repeats):  # alternately, so that the machine's drift falls on all alike
            for label, config, tokens, pack_length in runs:
                run_dir = work / "runs" / f"{name}-{label}-{repeat}".replace(" ", "_").replace(",", "")
                figures.append((name, label, *measured_batching(store, dataset, run_dir, config, args, tokens,
                                                                pack_length)))
    described = "tiny 4 x 192" if args.decoder == "tiny" else f"{args.decoder} ({args.decoder_mode})"
    print(f"\nmodel {described}, {args.updates} updates measured after {args.warmup}, batch {args.batch_size} "
          f"examples or the same mean in positions, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}, precision {args.precision}, {args.repeats} run(s) each (median)")
    for split in ("quickstart", "ReasonAQA-shaped"):
        labels = list(dict.fromkeys(label for name, label, *_ in figures if name == split))
        baseline = None
        for label in labels:
            shares, useful, samples = (np.median([f[i] for f in figures if f[0] == split and f[1] == label])
                                       for i in (2, 3, 4))
            baseline = baseline or useful
            print(f"{split:17s} {label:40s} useful share {shares:5.3f}, {useful:8.0f} useful tokens/s "
                  f"({useful / baseline:4.2f} x before), {samples:6.1f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", default="tiny", help="tiny (the quickstart's 4 x 192) or smollm2-135m")
    parser.add_argument("--decoder-mode", default="full", help="full, frozen or lora")
    parser.add_argument("--clips", type=int, default=400, help="synthetic clips in the dataset")
    parser.add_argument("--updates", type=int, default=30, help="updates measured in each loop")
    parser.add_argument("--warmup", type=int, default=3, help="updates run first and not measured")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="auto (the quickstart's: bf16 where the CPU has "
                                                           "native bf16, else fp32), fp32, bf16 or fp16 autocast, "
                                                           "in both loops")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both loops (the warmup "
                                                                "updates must then cover compilation)")
    parser.add_argument("--batching", default="", help="compare ways of batching instead: a comma-separated list of "
                                                        f"{', '.join(BATCHINGS)} (see above)")
    parser.add_argument("--dataset", type=Path, help="--batching: a quickstart dataset (default: made here)")
    parser.add_argument("--store", type=Path, help="--batching: the quickstart's store of --dataset")
    parser.add_argument("--reasonaqa-examples", type=int, default=3000, help="--batching: examples of the "
                                                                             "ReasonAQA-shaped split")
    parser.add_argument("--repeats", type=int, default=1, help="--batching: runs of each, alternately (median)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mellow-train-bench-"))
    if args.batching:
        args.batching = [name.strip() for name in args.batching.split(",")]
        unknown = [name for name in args.batching
                   if name not in BATCHINGS[:3] and not (name.startswith("packed:") and name[7:].isdigit())]
        if unknown or (args.dataset is None) != (args.store is None):
            parser.error(f"--batching takes {', '.join(BATCHINGS)} (got {', '.join(unknown)}); --dataset and "
                         "--store go together" if unknown else "--dataset and --store go together")
        compare_batchings(args, work)
        return
    dataset = prepare.run(PrepareConfig(root=work / "datasets", num_clips=args.clips))
    store = precompute.run(PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="whisper-tiny", tokens=16),
                                            store=StoreConfig(root=work / "shards"))).store_path
    shape = dict(tiny_hidden=192, tiny_layers=4, tiny_heads=4) if args.decoder == "tiny" else {}
    model = ModelConfig(decoder=args.decoder, decoder_mode=args.decoder_mode, **shape)
    ram, ram_wait = from_store(store, dataset, work / "ram", model, args, "ram")
    stream, stream_wait = from_store(store, dataset, work / "stream", model, args, "stream")
    raw, precision = raw_audio_loop(store, dataset, model, args)
    parameters = sum(p.numel() for p in build_model(model, 384, 0)[0].parameters()) / 1e6
    print(f"\nmodel {args.decoder} ({args.decoder_mode}, {parameters:.1f} M parameters), whisper-tiny 16 tokens, "
          f"batch {args.batch_size}, {args.updates} updates measured, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}, data workers {args.data_workers}"
          f"{', torch.compile' if args.compile else ''}, precision {args.precision} ({precision})")
    print(f"from the store, RAM cache           {ram:8.1f} samples/s, data wait {ram_wait:6.1%} of step time")
    print(f"from the store, streamed from Zarr  {stream:8.1f} samples/s, data wait {stream_wait:6.1%} of step time")
    print(f"raw audio in the loop               {raw:8.1f} samples/s (ffmpeg decode + whisper-tiny encode per batch)")
    print(f"store / raw audio                   {ram / raw:8.1f} x (RAM cache), {stream / raw:.1f} x (streamed)")


if __name__ == "__main__":
    main()
