"""Stage 03: train the audio projector and decoder from the embedding store (single process or torchrun).

Training is counted in optimizer updates. The order of examples is a pure function of (seed, epoch), and a
checkpoint records the update count, optimizer, scheduler and every rank's RNG state, so `--resume` continues
with the same batches and the same numbers as a run that was never stopped.

    <run_dir>/config.yaml          the resolved config (train + model sections)
    <run_dir>/metrics.jsonl        one line per logged update / validation
    <run_dir>/step-000500/         model.pt (trainable weights), optimizer.pt, trainer.json, rng-rank<r>.pt
    <run_dir>/latest.json          -> the newest complete checkpoint; best.json -> lowest validation loss
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from mellow import distributed
from mellow.config import build, setting, to_dict
from mellow.data import ExampleSet, load_examples, move_to
from mellow.decoders import load_decoder, load_tokenizer
from mellow.distributed import DistributedContext
from mellow.files import (
    read_json,
    read_jsonl,
    replace_directory,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from mellow.model import MellowModel, ModelConfig
from mellow.progress import console, progress_bar
from mellow.store import EmbeddingStore, EncoderExpectation


@dataclass
class TrainConfig:
    store: Path = setting(Path(""), "Embedding store folder made by 01_precompute (shards/<dataset>/<tag>).")
    dataset: Path = setting(Path("datasets/synth"), "Dataset folder with the <split>.jsonl example files.")
    run_dir: Path = setting(Path("checkpoints/run"), "Where checkpoints, metrics and the resolved config go.")
    train_split: str = setting("train", "Split to train on.")
    val_split: str = setting("val", "Split for validation loss.")
    max_updates: int = setting(1500, "Total optimizer updates of the run (the schedule spans these).")
    stop_after: int = setting(0, "Stop this invocation after this many updates (saving); 0 runs to max_updates.")
    batch_size: int = setting(32, "Global batch size (all ranks and accumulation steps together).")
    grad_accum: int = setting(1, "Micro-batches accumulated per update.")
    lr: float = setting(1e-3, "Peak learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only).")
    warmup_updates: int = setting(50, "Linear warmup updates before the cosine decay.")
    min_lr_ratio: float = setting(0.1, "Final learning rate as a fraction of lr.")
    clip_grad: float = setting(1.0, "Gradient-norm clipping threshold (0 disables).")
    val_every: int = setting(250, "Validate every this many updates (0 disables).")
    val_examples: int = setting(512, "Validation examples used each time (0: all).")
    save_every: int = setting(250, "Save a checkpoint every this many updates (0: only at the end and best).")
    keep_last: int = setting(2, "Numbered checkpoints kept besides the best one.")
    log_every: int = setting(10, "Write metrics every this many updates.")
    seed: int = setting(0, "Seed for initialisation, data order and dropout.")
    device: str = setting("auto", "auto (cuda if available), cpu, or cuda.")
    max_text_tokens: int = setting(96, "Prompt + answer tokens kept per example.")
    length_buckets: int = setting(1, "Micro-batches sorted by length together to cut padding (1: off). Faster "
                                     "per update, but the task-homogeneous batches learned slower here.")

    def __post_init__(self) -> None:
        positive = ("max_updates", "batch_size", "grad_accum", "log_every", "max_text_tokens", "length_buckets")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--train.{name} {getattr(self, name)} must be >= 1")
        for name in ("stop_after", "warmup_updates", "val_every", "val_examples", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"--train.{name} {getattr(self, name)} must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--train.lr must be > 0 and --train.min_lr_ratio in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--train.device {self.device!r} must be auto, cpu or cuda")


@dataclass
class TrainResult:
    run_dir: Path
    updates: int
    final_loss: float
    best_val_loss: float | None
    seconds: float


def resolved_config(train: TrainConfig, model: ModelConfig, expected: EncoderExpectation | None = None) -> dict:
    return {"train": to_dict(train), "model": to_dict(model), "encoder": vars(expected or EncoderExpectation())}


def run(train: TrainConfig, model_config: ModelConfig, resume: bool = False,
        expected: EncoderExpectation | None = None) -> TrainResult:
    """Train (or, with `resume`, continue) the run in train.run_dir; `expected` is what the store must be."""
    started = time.time()
    context, device = distributed.setup(train.device)
    try:
        expected = expected or EncoderExpectation()
        checkpoint = validate_args(train, model_config, resume, context, expected)
        result = fit(train, model_config, checkpoint, context, device, resolved_config(train, model_config, expected))
        result.seconds = time.time() - started
        report(result)
        return result
    finally:
        distributed.teardown()


def validate_args(train: TrainConfig, model_config: ModelConfig, resume: bool, context: DistributedContext,
                  expected: EncoderExpectation) -> Path | None:
    """Check inputs before any work; return the checkpoint to resume from, if any."""
    if not (train.store / "meta.json").is_file():
        raise ValueError(f"--train.store {str(train.store)!r} is not an embedding store; run 01_precompute "
                         "and pass its output folder (shards/<dataset>/<encoder-tag>)")
    fingerprint = EmbeddingStore(train.store).fingerprint
    if fingerprint.get("kind") == "text":
        raise ValueError(f"--train.store {train.store} holds caption text embeddings (precompute-captions); "
                         "pass an audio store made by 01_precompute")
    expected.check(train.store, fingerprint)
    if train.batch_size % (context.world_size * train.grad_accum):
        raise ValueError(f"--train.batch_size {train.batch_size} must be divisible by world size "
                         f"{context.world_size} x --train.grad_accum {train.grad_accum}")
    latest = train.run_dir / "latest.json"
    if latest.exists() and not resume:
        raise ValueError(f"{train.run_dir} already holds a run; pass --resume to continue it, or choose another "
                         "--train.run_dir")
    if not latest.exists():
        if resume:
            console.print(f"no checkpoint in {train.run_dir} yet; starting a new run")
        return None
    checkpoint = train.run_dir / read_json(latest)["path"]
    saved = read_json(checkpoint / "trainer.json")
    EmbeddingStore(train.store).check_fingerprint(saved["store_fingerprint"], f"resuming {checkpoint}")
    if saved["world_size"] != context.world_size:
        raise ValueError(f"{checkpoint} was saved by {saved['world_size']} process(es) and this run has "
                         f"{context.world_size}; resume with the same world size (exact resume needs it)")
    return checkpoint


def build_model(model_config: ModelConfig, audio_dim: int, seed: int) -> tuple[MellowModel, object]:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_config.decoder)
    shape = (model_config.tiny_hidden, model_config.tiny_layers, model_config.tiny_heads)
    language_model = load_decoder(model_config.decoder, tokenizer, shape)
    model = MellowModel(language_model, audio_dim, model_config.projector_dropout, model_config.loss_weighting)
    if model_config.decoder_mode == "frozen":
        model.language_model.requires_grad_(False)
    return model, tokenizer


def _schedule(train: TrainConfig):
    def factor(update: int) -> float:
        if update < train.warmup_updates:
            return (update + 1) / train.warmup_updates
        progress = (update - train.warmup_updates) / max(1, train.max_updates - train.warmup_updates)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _optimizer(model: MellowModel, train: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_matrix = parameter.dim() >= 2 and "embed" not in name
            (decay if is_matrix else no_decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.98), fused=True)


def epoch_micro_batches(lengths: list[int], micro_batch: int, seed: int, epoch: int,
                        bucket: int) -> list[list[int]]:
    """The global micro-batches of one epoch, a pure function of (seed, epoch).

    With `bucket` > 1, each run of `bucket` micro-batches of a random permutation is sorted by text length
    before it is cut, and the cut micro-batches are shuffled again: batches hold similar lengths, so far less
    padding is computed, while the epoch stays a random order.
    """
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    per_epoch = len(lengths) // micro_batch
    order = order[: per_epoch * micro_batch]
    batches = []
    span = micro_batch * max(bucket, 1)
    for start in range(0, len(order), span):
        group = order[start : start + span]
        if bucket > 1:
            group = sorted(group, key=lambda index: lengths[index])
        cut = [group[i : i + micro_batch] for i in range(0, len(group), micro_batch)]
        shuffled = torch.randperm(len(cut), generator=generator).tolist() if bucket > 1 else range(len(cut))
        batches.extend(cut[i] for i in shuffled)
    return batches


def micro_batches(lengths: list[int], micro_batch: int, seed: int, start: int, context: DistributedContext,
                  bucket: int) -> Iterator[tuple[int, list[int]]]:
    """Yield (epoch, this rank's example indices) for every global micro-batch from number `start` on, forever."""
    per_epoch = len(lengths) // micro_batch
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(lengths)} examples, fewer than one micro-batch "
                         f"({micro_batch}); lower --train.batch_size")
    epoch, offset = divmod(start, per_epoch)
    while True:
        for batch in epoch_micro_batches(lengths, micro_batch, seed, epoch, bucket)[offset:]:
            yield epoch, batch[context.rank :: context.world_size]
        epoch, offset = epoch + 1, 0


def fit(train: TrainConfig, model_config: ModelConfig, checkpoint: Path | None, context: DistributedContext,
        device: torch.device, resolved: dict) -> TrainResult:
    store = EmbeddingStore(train.store)
    model, tokenizer = build_model(model_config, store.dim, train.seed)
    train_set = ExampleSet(load_examples(train.dataset, train.train_split), store, tokenizer, train.max_text_tokens,
                           seed=train.seed)
    val_set = ExampleSet(load_examples(train.dataset, train.val_split), store, tokenizer, train.max_text_tokens,
                         embeddings=(train_set.embeddings, train_set.valid))
    model.to(device)
    optimizer = _optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(train))
    torch.manual_seed(train.seed + context.rank)  # dropout differs across ranks, reproducibly
    update, best_val = 0, None
    if checkpoint is not None:
        update, best_val = load_checkpoint(checkpoint, model, optimizer, scheduler, context)
        console.print(f"resuming {train.run_dir} from update {update} ({checkpoint.name})")
        metrics = train.run_dir / "metrics.jsonl"
        if context.is_main and metrics.exists():  # a killed run may have logged updates past its checkpoint
            write_jsonl_atomic(metrics, [row for row in read_jsonl(metrics) if row["update"] <= update])
    elif context.is_main:
        train.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(train.run_dir / "config.yaml", yaml.safe_dump(resolved))
    wrapped = DistributedDataParallel(model) if context.world_size > 1 else model
    micro_batch = train.batch_size // train.grad_accum
    lengths = [len(item.prompt_ids) + len(item.answer_ids) for item in train_set.items]
    batches = micro_batches(lengths, micro_batch, train.seed, update * train.grad_accum, context,
                            train.length_buckets)
    stop_at = min(train.max_updates, update + train.stop_after) if train.stop_after else train.max_updates
    window_loss, window_start, last_loss = 0.0, time.time(), float("nan")
    meta = {"store_fingerprint": store.fingerprint, "store": str(train.store), "config": resolved}
    with progress_bar() as progress:
        task = progress.add_task("training", total=train.max_updates, completed=update)
        while update < stop_at:
            model.train()
            for _ in range(train.grad_accum):
                epoch, indices = next(batches)
                loss = wrapped(move_to(train_set.batch(indices, epoch=epoch), device)) / train.grad_accum
                loss.backward()
                window_loss += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            update += 1
            if update % train.log_every == 0 or update == stop_at:
                count = train.log_every if update % train.log_every == 0 else update % train.log_every
                last_loss = distributed.mean_across_ranks(window_loss / count, device)
                rate = count * train.batch_size / (time.time() - window_start)
                _log(train, context, {"update": update, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                                      "grad_norm": float(grad_norm), "samples_per_s": rate})
                progress.update(task, status=f"loss {last_loss:.3f}, {rate:.0f} samples/s")
                window_loss, window_start = 0.0, time.time()
            validate_now = train.val_every and (update % train.val_every == 0 or update == train.max_updates)
            val_loss = validation_loss(model, val_set, train, context, device) if validate_now else None
            if val_loss is not None:
                _log(train, context, {"update": update, "val_loss": val_loss})
                progress.console.print(f"update {update}: validation loss {val_loss:.4f}")
            is_best = val_loss is not None and (best_val is None or val_loss < best_val)
            best_val = val_loss if is_best else best_val
            if (train.save_every and update % train.save_every == 0) or update == stop_at or is_best:
                save_checkpoint(train, model, optimizer, scheduler, update, best_val, is_best,
                                context, meta)
            progress.update(task, completed=update)
    return TrainResult(train.run_dir, update, last_loss, best_val, 0.0)


@torch.no_grad()
def validation_loss(model: MellowModel, val_set: ExampleSet, train: TrainConfig, context: DistributedContext,
                    device: torch.device) -> float:
    model.eval()
    count = len(val_set) if not train.val_examples else min(train.val_examples, len(val_set))
    indices = list(range(count))[context.rank :: context.world_size]
    step = train.batch_size // context.world_size
    losses = [model(move_to(val_set.batch(indices[i : i + step]), device)).item()
              for i in range(0, len(indices), step)]
    return distributed.mean_across_ranks(sum(losses) / max(len(losses), 1), device)


def _log(train: TrainConfig, context: DistributedContext, record: dict) -> None:
    if context.is_main:
        with open(train.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({**record, "time": time.time()}) + "\n")


def save_checkpoint(train: TrainConfig, model: MellowModel, optimizer: torch.optim.Optimizer, scheduler, update: int,
                    best_val: float | None, is_best: bool, context: DistributedContext, meta: dict) -> None:
    """Write step-NNNNNN/ via a temporary folder (every rank adds its RNG state), then point latest at it."""
    name = f"step-{update:06d}"
    temporary = train.run_dir / f".{name}.tmp"
    if context.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    distributed.barrier()
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
               temporary / f"rng-rank{context.rank}.pt")
    distributed.barrier()
    if context.is_main:
        torch.save(model.trainable_state_dict(), temporary / "model.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   temporary / "optimizer.pt")
        write_json_atomic(temporary / "trainer.json", {
            "update": update, "best_val_loss": best_val, "world_size": context.world_size, **meta})
        replace_directory(temporary, train.run_dir / name)
        write_json_atomic(train.run_dir / "latest.json", {"path": name, "update": update})
        if is_best:
            write_json_atomic(train.run_dir / "best.json", {"path": name, "update": update, "val_loss": best_val})
        _prune(train)
    distributed.barrier()


def _prune(train: TrainConfig) -> None:
    protected = {read_json(train.run_dir / f)["path"] for f in ("latest.json", "best.json")
                 if (train.run_dir / f).exists()}
    numbered = sorted(p for p in train.run_dir.glob("step-*") if p.is_dir())
    for old in numbered[: max(0, len(numbered) - train.keep_last)]:
        if old.name not in protected:
            shutil.rmtree(old)


def load_checkpoint(checkpoint: Path, model: MellowModel, optimizer: torch.optim.Optimizer, scheduler,
                    context: DistributedContext) -> tuple[int, float | None]:
    model.load_trainable_state_dict(torch.load(checkpoint / "model.pt", map_location="cpu"))
    states = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(checkpoint / f"rng-rank{context.rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer = read_json(checkpoint / "trainer.json")
    return trainer["update"], trainer["best_val_loss"]


def report(result: TrainResult) -> None:
    best = f", best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    last = "nothing left to train" if math.isnan(result.final_loss) else f"last loss {result.final_loss:.4f}"
    console.print(f"[bold green]trained[/] {result.run_dir}: {result.updates} updates, {last}{best} "
                  f"in {result.seconds:.1f} s")


def find_checkpoint(path: Path, which: str = "latest") -> Path:
    """A checkpoint folder from a run folder (`latest` or `best`) or a checkpoint folder itself."""
    if (path / "trainer.json").exists():
        return path
    pointer = path / f"{which}.json"
    if not pointer.exists():
        raise FileNotFoundError(f"{path} holds no {which} checkpoint (no {pointer.name}); train first")
    return path / read_json(pointer)["path"]


def load_trained_model(checkpoint: Path, device: torch.device) -> tuple[MellowModel, object, dict]:
    """Rebuild the model of a checkpoint and load its weights; returns (model, tokenizer, trainer.json)."""
    trainer = read_json(checkpoint / "trainer.json")
    model_config = build(ModelConfig, trainer["config"]["model"], "model")
    model, tokenizer = build_model(model_config, trainer["store_fingerprint"]["dim"], seed=0)
    model.load_trainable_state_dict(torch.load(checkpoint / "model.pt", map_location="cpu"))
    return model.to(device).eval(), tokenizer, trainer

