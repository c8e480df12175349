"""Stage 03: train the audio projector and decoder from the embedding store (single process or torchrun).

Training is counted in optimizer updates. The order of examples is a pure function of (seed, epoch), and a
checkpoint records the update, the position in that order, the optimizer, scheduler and grad scaler, and every
rank's random states (see mellow/train/checkpoint.py), so `--resume` continues with the same batches and the same
numbers as a run that was never stopped, mid-epoch too. A run stops early, saving first, on SIGTERM/SIGUSR1
or before its time limit (mellow/train/stopping.py), and under SLURM requeues itself.

    <run_dir>/config.yaml          the resolved config (train, model, encoder sections)
    <run_dir>/metrics.jsonl        one line per logged update / validation
    <run_dir>/step-000500/         a checkpoint; latest.json and best.json point to checkpoints
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from mellow import answers, distributed
from mellow.config import describe_differences, options_of, to_dict
from mellow.distributed import DistributedContext
from mellow.files import read_json, sha256_file, write_json_atomic, write_text_atomic
from mellow.manifests import label_tasks_of
from mellow.model.decoders import decoder_reference
from mellow.model.modeling import MellowModel, build_model, check_packing, embedding_rms
from mellow.progress import console, progress_bar
from mellow.settings import ModelConfig, TrainConfig, TrainJob, saved_settings
from mellow.store.reader import EmbeddingStore, dataset_of
from mellow.store.writer import EncoderExpectation
from mellow.train.allocator import keep_freed_memory
from mellow.train.batching import FixedBatches, PackedBatches, TokenBatches
from mellow.train.checkpoint import (
    TrainingState,
    check_base_decoder,
    initialise_from,
    load_aligned_projector,
    load_checkpoint,
    read_alignment,
    report_world_size_change,
    save_checkpoint,
)
from mellow.train.data import ExampleSet, batch_loader, embedding_rows, move_to, split_path, workers_ended
from mellow.train.runs import find_checkpoint
from mellow.train.schedule import RULES, Replan, Schedule
from mellow.train.stopping import StopControl, requeue_slurm_job
from mellow.train.throughput import FlopModel, Work, describe, device_peak, work_of
from mellow.train.tracking import Tracker, peak_memory_mb


@dataclass
class TrainResult:
    run_dir: Path
    updates: int
    final_loss: float
    best_value: float | None  # of train.checkpoint.best_metric
    seconds: float
    stop_reason: str | None = None  # why the invocation stopped before max_updates (None: it did not)
    peak_memory_mb: float = 0.0
    interrupted: bool = False  # stopped (and saved) for Ctrl-C: the command then exits with 130
    rates: dict[str, float] = dataclasses.field(default_factory=dict)  # this invocation's work (throughput.Work)
    peak_source: str = ""  # where MFU's peak FLOP/s came from, or why MFU is omitted
    epochs: float = 0.0  # the epochs of the training split gone through


def resolved_config(train: TrainConfig, model: ModelConfig, expected: EncoderExpectation | None = None) -> dict:
    return {"train": to_dict(train), "model": to_dict(model), "encoder": vars(expected or EncoderExpectation())}


def run(train: TrainConfig, model_config: ModelConfig, resume: bool = False,
        expected: EncoderExpectation | None = None) -> TrainResult:
    """Train (or, with `resume`, continue) the run in train.run_dir; `expected` is what the store must be."""
    started = time.time()
    train = with_dataset(train)
    store = open_training_store(train)
    context, device = distributed.setup(train.device, train.dist_timeout)
    try:
        limits = train.checkpoint
        with StopControl(started, limits.time_limit, limits.slurm_time_limit, limits.stop_margin, device) as stopper:
            resolved = resolved_config(train, model_config, expected)
            checkpoint, initial = validate_args(train, model_config, store, resume, context,
                                                expected or EncoderExpectation(), resolved)
            training = setup(train, model_config, store, checkpoint, initial, context, device, resolved, stopper)
            train = training.train  # with the run's length in updates (--train.epochs made concrete)
            result = fit(training)
            result.interrupted = stopper.interrupted
        if result.stop_reason and stopper.preempted and train.checkpoint.requeue and context.is_main:
            requeue_slurm_job()
        result.seconds = time.time() - started
        report(result, train)
        return result
    except RuntimeError as error:
        distributed.raise_if_peer_lost(error, context, f"continue from {train.run_dir} with --resume")
        raise
    finally:
        distributed.teardown()


def with_dataset(train: TrainConfig) -> TrainConfig:
    """`train` with its dataset: --train.dataset, else the one its store was made from (said), so that a store of
    any dataset trains on that dataset's examples."""
    if train.dataset is not None:
        return train
    dataset = dataset_of(train.store, "--train.dataset")
    console.print(f"dataset {dataset} (from the store's meta.json; --train.dataset sets another)", highlight=False)
    return dataclasses.replace(train, dataset=dataset)


def open_training_store(train: TrainConfig) -> EmbeddingStore:
    """The store --train.store names, opened once for the whole run: an audio store made by 01_precompute."""
    if not (train.store / "meta.json").is_file():
        raise ValueError(f"--train.store {str(train.store)!r} is not an embedding store; run 01_precompute "
                         "and pass its output folder (shards/<dataset>/<encoder-tag>)")
    store = EmbeddingStore(train.store)
    if store.fingerprint.get("kind") == "text":
        raise ValueError(f"--train.store {train.store} holds caption text embeddings (precompute-captions); "
                         "pass an audio store made by 01_precompute")
    return store


def validate_args(train: TrainConfig, model_config: ModelConfig, store: EmbeddingStore, resume: bool,
                  context: DistributedContext, expected: EncoderExpectation,
                  resolved: dict) -> tuple[Path | None, Path | None]:
    """Check inputs before any work; return the checkpoint to resume from and the one to initialise from."""
    expected.check(train.store, store.fingerprint)
    if not train.data.batch_tokens and train.data.batch_size % (context.world_size * train.data.grad_accum):
        raise ValueError(f"--train.batch_size {train.data.batch_size} must be divisible by world size "
                         f"{context.world_size} x --train.grad_accum {train.data.grad_accum}")
    if train.data.packing == "on" and model_config.missing_audio != "marker":
        raise ValueError("--train.packing on needs --model.missing_audio marker: the block layout keeps masked "
                         "slots inside each example, which a packed row cannot hold")
    latest = train.run_dir / "latest.json"
    if train.checkpoint.resume_from != "latest" and not resume:
        raise ValueError(f"--train.resume_from {train.checkpoint.resume_from} continues a run: pass --resume too (or "
                         "--resume-from, which is both)")
    if latest.exists() and not resume:
        raise ValueError(f"{train.run_dir} already holds a run; pass --resume to continue it, or choose another "
                         "--train.run_dir")
    if not latest.exists():
        if resume:
            console.print(f"no checkpoint in {train.run_dir} yet; starting a new run")
        if train.align_from is not None:
            read_alignment(train.align_from)  # before any work: the folder holds a finished alignment
        return None, check_init_from(train, model_config, store) if train.init_from else None
    checkpoint = find_checkpoint(train.run_dir, train.checkpoint.resume_from, "--train.resume_from")
    saved = read_json(checkpoint / "trainer.json")
    store.check_fingerprint(saved["store_fingerprint"], f"resuming {checkpoint}")
    changes = store.changes_since(saved.get("store_revision", 0))
    if changes:
        console.print(f"[yellow]note:[/] the store changed since {checkpoint.name} was saved on it (revision "
                      f"{saved.get('store_revision', 0)} -> {store.revision}): {changes}. Training goes on with the "
                      "store as it is now", highlight=False)
    check_resumable_config(saved["config"], resolved, checkpoint)
    split = split_path(train.dataset, train.data.train_split)
    if sha256_file(split) != saved["train_split_sha256"]:
        raise ValueError(f"{split} changed since {checkpoint} was saved: resuming would train on other "
                         "examples. Restore it, or start a new run (--train.run_dir)")
    return checkpoint, None


def branch_from(run_dir: Path, checkpoint: Path) -> Path | None:
    """Make `checkpoint` the run's latest before continuing from it: the checkpoints newer than it, and the
    metrics logged and re-plans made past it, move to <run_dir>/branches/<from>-<time>/, and branches.json records
    the branch point. Returns that folder, or None when the checkpoint is already the newest (rank 0 only)."""
    update = read_json(checkpoint / "trainer.json")["update"]
    newer = sorted(p for p in run_dir.glob("step-*") if (p / "trainer.json").is_file()
                   and read_json(p / "trainer.json")["update"] > update)
    if not newer:
        return None
    kept = run_dir / "branches" / f"{checkpoint.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    kept.mkdir(parents=True)
    latest_before = read_json(run_dir / "latest.json")
    for folder in newer:
        folder.rename(kept / folder.name)
    for pointer in ("latest.json", "best.json", "metrics.jsonl", "replans.json"):
        if (run_dir / pointer).is_file():
            shutil.copy2(run_dir / pointer, kept / pointer)
    if (run_dir / "replans.json").is_file():  # the re-plans of the moved checkpoints go with them
        write_json_atomic(run_dir / "replans.json", [record for record in read_json(run_dir / "replans.json")
                                                     if record["at"] <= update])
    best = run_dir / "best.json"
    if best.is_file() and not (run_dir / read_json(best)["path"]).is_dir():
        best.unlink()  # it was one of the newer checkpoints; validation finds the new branch's best again
    write_json_atomic(run_dir / "latest.json", {"path": checkpoint.name, "update": update})
    history = read_json(run_dir / "branches.json") if (run_dir / "branches.json").is_file() else []
    write_json_atomic(run_dir / "branches.json", history + [{
        "from": checkpoint.name, "update": update, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "previous_latest": latest_before["path"], "kept_in": str(kept.relative_to(run_dir)),
        "moved": [folder.name for folder in newer]}])
    return kept


def check_init_from(train: TrainConfig, model_config: ModelConfig, store: EmbeddingStore) -> Path:
    """The checkpoint --train.init_from names, if its weights can start this run."""
    source = find_checkpoint(train.init_from, option="--train.init_from")
    trainer = read_json(source / "trainer.json")
    check_base_decoder(source, trainer)
    if trainer["config"]["model"]["decoder"] != model_config.decoder:
        raise ValueError(f"--train.init_from {source} was trained with decoder {trainer['config']['model']['decoder']}"
                         f"; this run uses {model_config.decoder}. Use the same --model.decoder")
    store.check_fingerprint(trainer["store_fingerprint"], f"--train.init_from {source}")
    return source


def check_resumable_config(saved: dict, now: dict, checkpoint: Path) -> None:
    """Refuse a resume whose config changes the training (any train: or model: setting not marked on_resume),
    listing every such option. A checkpoint saved before the train: section had components reads the same."""
    changed = describe_differences(_fixed_settings(saved), _fixed_settings(now))
    if changed:
        raise ValueError(f"resuming {checkpoint} with options that change the training:\n  " + "\n  ".join(changed)
                         + "\nresume with the run's own config (it is the default with --resume); a resume may "
                         "change the run's length (--train.max_updates or --train.epochs: the rest is re-planned) "
                         "and the options marked so in --help. To train these weights with other settings, start "
                         f"a new run from them: --init-from {checkpoint} --train.run_dir <new folder>")


def _fixed_settings(config: dict) -> dict:
    """{dotted name: value} of the train: and model: settings of a saved config that a resume may not change (the
    run's length may change: planned_run re-plans the rest)."""
    options = {option.dotted: option for option in options_of(TrainJob)}
    return {name: value for name, value in saved_settings(config).items() if name.split(".")[0] in ("train", "model")
            and not (name in options and options[name].on_resume) and name not in ("train.max_updates", "train.epochs")}


def first_schedule(train: TrainConfig, length: int) -> Schedule:
    """The schedule of a run of `length` updates as its settings give it (mellow/train/schedule.py)."""
    optimizer = train.optimizer
    return Schedule(optimizer.schedule, optimizer.warmup_updates, optimizer.cooldown_updates,
                    optimizer.min_lr_ratio, length)


def schedule_record(schedule: Schedule) -> dict:
    """How trainer.json keeps a run's schedule: its first plan and its re-plans."""
    return {"kind": schedule.kind, "warmup": schedule.warmup, "cooldown": schedule.cooldown,
            "min_ratio": schedule.min_ratio, "end": schedule.end,
            "replans": [replan.as_dict() for replan in schedule.replans]}


def saved_schedule(saved: dict) -> Schedule:
    """The schedule a checkpoint's trainer.json records (one saved before re-plans existed: its config's)."""
    if "schedule" in saved:
        record = saved["schedule"]
        return Schedule(record["kind"], record["warmup"], record["cooldown"], record["min_ratio"], record["end"],
                        tuple(Replan(**replan) for replan in record["replans"]))
    train = saved_settings(saved["config"])
    return Schedule(train.get("train.optimizer.schedule", "cosine"), train["train.optimizer.warmup_updates"],
                    train["train.optimizer.cooldown_updates"], train["train.optimizer.min_lr_ratio"],
                    train["train.max_updates"])


def run_length(train: TrainConfig, plan: FixedBatches | TokenBatches, world_size: int) -> int:
    """The run's length in updates: --train.epochs of the plan (its epochs as planned, rounded up to a whole
    update), else --train.max_updates."""
    if not train.epochs:
        return train.max_updates
    whole, part = int(train.epochs), train.epochs - int(train.epochs)
    if isinstance(plan, TokenBatches):
        batches = sum(plan.batches_in(epoch) for epoch in range(whole)) + part * plan.batches_in(whole)
    else:
        batches = train.epochs * plan.per_epoch
    return max(1, math.ceil(batches / plan.per_update(world_size) - 1e-9))


def planned_run(train: TrainConfig, plan: FixedBatches | TokenBatches, checkpoint: Path | None, resolved: dict,
                context: DistributedContext) -> tuple[TrainConfig, Schedule]:
    """The run's settings with its length in updates (--train.epochs made concrete), and its learning-rate
    schedule: a new run's first plan; a resumed run's schedule as its checkpoint recorded it, re-planned when the
    resume gives the run another length (recorded in <run>/replans.json and config.yaml)."""
    saved = read_json(checkpoint / "trainer.json") if checkpoint else None
    if train.epochs:  # the length is the epochs': a max_updates given as well would be ignored, so it is refused
        before = saved["config"]["train"]["max_updates"] if saved else TrainConfig.max_updates
        if train.max_updates != before:
            raise ValueError(f"--train.max_updates {train.max_updates} and --train.epochs {train.epochs:g} both give "
                             "the run's length; give one (--train.epochs 0 to go by --train.max_updates)")
    length = run_length(train, plan, context.world_size)
    train = dataclasses.replace(train, max_updates=length)
    resolved["train"]["max_updates"] = length
    if checkpoint is None:
        check_schedule_fits(train, length)
        return train, first_schedule(train, length)
    schedule, at = saved_schedule(saved), saved["update"]
    if length == schedule.planned:
        return train, schedule
    if length <= at:
        raise ValueError(f"{_length_option(train, length)} ends at or before update {at}, where "
                         f"{checkpoint.name} stands: a resume goes on from there. To continue from an earlier point, "
                         "--resume-from step-N (N below the new end); to train these weights anew, --init-from "
                         f"{checkpoint} --train.run_dir <new folder>")
    schedule = schedule.replanned(at, length)
    replan = schedule.replans[-1]
    console.print(f"re-planned: {replan.before} -> {replan.after} updates from update {at} ({checkpoint.name}); "
                  f"learning rate: {RULES[replan.rule]}", highlight=False)
    if context.is_main:
        record_replan(train.run_dir, replan, checkpoint, resolved)
    return train, schedule


def replan_lines(run_dir: Path) -> list[str]:
    """How --print-config shows a run's re-plans (<run>/replans.json), as YAML comments."""
    path = run_dir / "replans.json"
    if not path.is_file():
        return []
    return ["# re-planned (replans.json):"] + [
        f"#   at update {record['at']} ({record['checkpoint']}): {record['before']} -> {record['after']} updates; "
        f"{RULES.get(record['rule'], record['rule'])}" for record in read_json(path)]


def _length_option(train: TrainConfig, length: int) -> str:
    """The option that gave the run's length of `length` updates, as an error names it."""
    return f"--train.epochs {train.epochs:g} ({length} updates)" if train.epochs else f"--train.max_updates {length}"


def check_schedule_fits(train: TrainConfig, length: int) -> None:
    optimizer = train.optimizer
    if optimizer.cooldown_updates and optimizer.warmup_updates + optimizer.cooldown_updates > length:
        raise ValueError(f"--train.warmup_updates {optimizer.warmup_updates} + --train.cooldown_updates "
                         f"{optimizer.cooldown_updates} must not exceed {_length_option(train, length)}")


def record_replan(run_dir: Path, replan: Replan, checkpoint: Path, resolved: dict) -> None:
    """Add `replan` to <run>/replans.json (once: a resume of the same re-plan after a stop records nothing new)
    and write the new length into config.yaml, so that a plain --resume continues the new plan."""
    path = run_dir / "replans.json"
    records = read_json(path) if path.is_file() else []
    entry = {**replan.as_dict(), "checkpoint": checkpoint.name,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())}
    if not any({key: record.get(key) for key in ("at", "before", "after")} ==
               {key: entry[key] for key in ("at", "before", "after")} for record in records):
        write_json_atomic(path, records + [entry])
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved))


def _optimizer(model: MellowModel, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a parameter group per part (projector, decoder) and decay kind (matrices decay, the rest not),
    each part at its own peak learning rate."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = "decoder" if name.startswith("language_model.") else "projector"
            decays = parameter.dim() >= 2 and "embed" not in name
            groups.setdefault((part, decays), []).append(parameter)
    settings = train.optimizer
    peak = {"projector": settings.projector_lr or settings.lr, "decoder": settings.decoder_lr or settings.lr}
    return torch.optim.AdamW([{"params": parameters, "lr": peak[part], "name": f"{part}/{'decay' if decays else 'no'}",
                               "weight_decay": settings.weight_decay if decays else 0.0}
                              for (part, decays), parameters in sorted(groups.items())], betas=(0.9, 0.98), fused=True)


def balancing_weights(train: TrainConfig, train_set: ExampleSet) -> np.ndarray:
    """Per-example class weights of the training split's closed-label tasks, said in one line per task."""
    label_tasks = label_tasks_of(train.dataset)
    if not label_tasks:
        raise ValueError(f"--train.balance {train.data.balance}: {train.dataset} declares no closed-label task (its "
                         "prepare.json has no label_tasks); use --train.balance off")
    weights = train_set.class_weights(label_tasks)
    for task, labels in label_tasks.items():
        console.print(f"balancing the {len(labels)} classes of {task} by {train.data.balance}", highlight=False)
    return weights


@dataclass
class LogWindow:
    """The updates since the last logged line: this rank's work in them (seconds: of training steps alone)."""

    work: Work = dataclasses.field(default_factory=Work)


@dataclass
class Training:
    """What one invocation trains with, built once by `setup`; `fit` runs the loop on it."""

    train: TrainConfig
    context: DistributedContext
    device: torch.device
    model: MellowModel
    wrapped: torch.nn.Module  # the model, or its DistributedDataParallel wrapper (for no_sync)
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # the loss as the loop computes it (wrapped, compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    state: TrainingState
    val_set: ExampleSet
    plan: FixedBatches | TokenBatches
    batches: Iterator[dict[str, torch.Tensor]]
    tracker: Tracker
    stopper: StopControl
    meta: dict  # what every checkpoint records beside the weights
    stop_at: int  # the update this invocation stops at (--train.stop_after, else max_updates)
    flops: FlopModel
    peak: float | None  # one device's peak FLOP/s in the run's precision (None: MFU omitted)
    peak_source: str
    totals: Work = dataclasses.field(default_factory=Work)  # this invocation's work, all ranks

    def save(self, is_best: bool) -> None:
        started = time.time()
        save_checkpoint(self.train.run_dir, self.train.checkpoint.keep_last, self.model, self.optimizer, self.scheduler,
                        self.scaler, self.state, is_best, self.context, self.meta)
        self.stopper.save_took(time.time() - started)


def setup(train: TrainConfig, model_config: ModelConfig, store: EmbeddingStore, checkpoint: Path | None,
          initial: Path | None, context: DistributedContext, device: torch.device, resolved: dict,
          stopper: StopControl) -> Training:
    """Build everything the loop needs. The order matters: seeds and random draws happen as in every run before,
    so that a resumed run stays bitwise equal to one never stopped."""
    model, tokenizer = build_training_model(train, model_config, store, checkpoint, initial)
    train_set, val_set, split_sha256 = load_splits(train, store, tokenizer, model)
    model.to(device)
    precision = training_precision(model, train.precision, device)
    if train.data.packing == "on":
        check_packing(model, model_config.decoder)
    if train.precision == "auto":
        console.print(f"precision auto: {precision} autocast on {device.type}")
    optimizer = _optimizer(model, train)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    peak = device_peak(device, precision)  # before any seeded draw: it draws from a generator of its own
    console.print(peak[1], highlight=False)
    torch.manual_seed(train.seed + context.rank)  # dropout differs across ranks, reproducibly
    plan = data_plan(train, train_set, model, store, checkpoint, context)
    train, schedule = planned_run(train, plan, checkpoint, resolved, context)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: schedule(update))  # a function: the
    # scheduler's state_dict keeps no copy of it, the checkpoint's trainer.json holds the schedule
    state = restore_or_start(train, checkpoint, model, optimizer, scheduler, scaler, context, resolved, plan)
    # a run started again from nothing (killed before its first checkpoint) drops what it logged: every update once
    tracking = train.tracking
    tracker = Tracker(train.run_dir, resolved, context.is_main, state.update, tracking.tensorboard, tracking.wandb,
                      tracking.wandb_project)
    wrapped = DistributedDataParallel(model) if context.world_size > 1 else model
    if train.compile:  # the partitioner keeps activations up to this share of the memory, recomputes the rest
        torch._functorch.config.activation_memory_budget = train.mem_budget
    forward = torch.compile(wrapped, dynamic=True) if train.compile else wrapped  # text lengths vary per batch
    batches = training_batches(train, train_set, plan, state, context, device)
    stop_after = train.checkpoint.stop_after
    stop_at = min(train.max_updates, state.update + stop_after) if stop_after else train.max_updates
    meta = {"store_fingerprint": store.fingerprint, "store_revision": store.revision, "store": str(train.store),
            "config": resolved, "base_decoder": decoder_reference(model_config.decoder, train.seed),
            "train_split_sha256": split_sha256, "initialised_from": str(initial) if initial else None,
            "batches_per_update": plan.per_update(context.world_size), "schedule": schedule_record(schedule)}
    return Training(train, context, device, model, wrapped, forward, optimizer, scheduler, scaler,
                    mixed_precision(precision, device), state, val_set, plan, batches, tracker, stopper, meta,
                    stop_at, FlopModel.of(model), *peak)


def build_training_model(train: TrainConfig, model_config: ModelConfig, store: EmbeddingStore,
                         checkpoint: Path | None, initial: Path | None) -> tuple[MellowModel, object]:
    """The model and its tokenizer, with its starting weights: --train.init_from's, or a projector aligned by
    02_align (a resumed run gets its weights from the checkpoint later)."""
    model, tokenizer = build_model(model_config, store.dim, train.seed)
    if train.mem_budget < 1.0 and not train.compile:
        checkpointed = model.checkpoint_layers(1.0 - train.mem_budget)
        console.print(f"--train.mem_budget {train.mem_budget:g}: {checkpointed} decoder layer(s) recompute their "
                      "activations in the backward pass")
    if initial is not None:
        loaded = initialise_from(initial, model)
        console.print(f"initialised from {initial} ({loaded} tensors): a new run, with a new optimizer, schedule "
                      "and data order")
    elif train.align_from is not None and checkpoint is None:
        load_aligned_projector(train.align_from, model.audio_projector, store)
        if model_config.audio_scale == "embeddings":  # the aligned projector's output, brought to text-token size
            with torch.no_grad():
                scale = embedding_rms(model.language_model)
                model.audio_projector.layer_norm.weight.mul_(scale)
                model.audio_projector.layer_norm.bias.mul_(scale)
        console.print(f"audio projector warm-started from {train.align_from}")
    return model, tokenizer


def load_splits(train: TrainConfig, store: EmbeddingStore, tokenizer,
                model: MellowModel) -> tuple[ExampleSet, ExampleSet, str]:
    """The training and validation examples (tokenised once, cached), sharing one reader of the store's rows,
    and the sha256 of the training split that checkpoints record."""
    rows = embedding_rows(store, train.data.data_cache, train.data.ram_cache_gb)
    split_sha256 = sha256_file(split_path(train.dataset, train.data.train_split))
    data = train.data
    train_set = ExampleSet.from_split(train.dataset, data.train_split, store, tokenizer, data.max_text_tokens,
                                      rows=rows, seed=train.seed, prompt_suffix=model.prompt_suffix,
                                      split_sha256=split_sha256)
    val_set = ExampleSet.from_split(train.dataset, data.val_split, store, tokenizer, data.max_text_tokens,
                                    rows=rows, prompt_suffix=model.prompt_suffix)
    return train_set, val_set, split_sha256


def restore_or_start(train: TrainConfig, checkpoint: Path | None, model: MellowModel,
                     optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                     context: DistributedContext, resolved: dict,
                     plan: FixedBatches | TokenBatches) -> TrainingState:
    """Continue from `checkpoint` (making it the run's latest first: a branch), or start the run folder."""
    if checkpoint is None:
        if context.is_main:
            train.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(train.run_dir / "config.yaml", yaml.safe_dump(resolved))
        return TrainingState()
    if context.is_main and (kept := branch_from(train.run_dir, checkpoint)) is not None:
        console.print(f"continuing from {checkpoint.name}, an earlier checkpoint: the newer ones and their "
                      f"metrics are kept in {kept} (branches.json records the branch point)")
    distributed.barrier()
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, context, train.seed)
    saved_world = read_json(checkpoint / "trainer.json")["world_size"]
    if saved_world != context.world_size:
        report_world_size_change(saved_world, context.world_size)
    epoch, position = plan.locate(state.micro_batches)
    console.print(f"resuming {train.run_dir} from update {state.update} ({checkpoint.name}): epoch {epoch}, "
                  f"micro-batch {position} of it")
    return state


def data_plan(train: TrainConfig, train_set: ExampleSet, model: MellowModel, store: EmbeddingStore,
              checkpoint: Path | None, context: DistributedContext) -> FixedBatches | TokenBatches:
    """The run's batches (mellow/train/batching.py): of batch_size examples, or of batch_tokens positions planned
    from the token cache's lengths (in packed rows with --train.packing on), as many per update as the run's first
    world size x grad_accum; class balancing (--train.balance) draws or weighs the examples."""
    data = train.data
    weights = balancing_weights(train, train_set) if data.balance != "off" else None
    if data.balance == "loss":
        train_set.loss_weights = weights / weights.mean()  # the average example still weighs 1
    drawn = weights if data.balance == "sampler" else None
    if data.batch_tokens:
        positions = model.sequence_positions(train_set.lengths(), store.tokens, *train_set.valid_tokens())
        saved = read_json(checkpoint / "trainer.json") if checkpoint else {}
        per_update = saved.get("batches_per_update", context.world_size * data.grad_accum)
        if data.packing == "on":
            plan = PackedBatches(positions, data.batch_tokens, data.pack_length, per_update, train.seed, drawn,
                                 train_set.source, train_set.tokenized.line)
        else:
            plan = TokenBatches(positions, data.batch_tokens, per_update, train.seed,
                                data.token_buckets, drawn, train_set.source, train_set.tokenized.line)
        plan.micro_steps(context.world_size)  # refuses a world size that cannot share an update
        return plan
    return FixedBatches(train_set.lengths(), data.batch_size, data.grad_accum, train.seed, data.length_buckets, drawn)


def training_batches(train: TrainConfig, train_set: ExampleSet, plan: FixedBatches | TokenBatches,
                     state: TrainingState, context: DistributedContext,
                     device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from the run's position on, assembled in DataLoader workers."""
    data = train.data
    order = plan.stream(state.micro_batches, context)
    return batch_loader(train_set, order, data.data_workers, data.prefetch, pin_memory=device.type == "cuda")


def fit(t: Training) -> TrainResult:
    """The training loop: an update, its log line, validation, checkpoints, and whether to stop early."""
    train, state, every = t.train, t.state, t.train.checkpoint
    window, last_loss, stop_reason, validation_seconds = LogWindow(), float("nan"), None, 0.0
    keep_freed_memory()  # every step reuses the last one's large blocks: ~5-10% faster on CPU (train/allocator.py)
    with t.tracker, progress_bar() as progress, workers_ended(t.batches):
        task = progress.add_task("training", total=train.max_updates, completed=state.update)
        while state.update < t.stop_at:
            update_started = time.time()
            grad_norm = train_step(t, window)
            window.work.seconds += time.time() - update_started
            if state.update % train.tracking.log_every == 0 or state.update == t.stop_at:
                last_loss, rates = log_window(t, window, grad_norm)
                skipped = f", {state.skipped_updates} skipped" if state.skipped_updates else ""
                epochs = t.plan.epochs_at(state.micro_batches)
                progress.update(task, status=f"epoch {epochs:.2f}, loss {last_loss:.3f}, {describe(rates)}{skipped}")
                window = LogWindow()
            t.stopper.update_took(time.time() - update_started)
            is_best = False
            if every.val_every and (state.update % every.val_every == 0 or state.update == train.max_updates):
                validation_started = time.time()
                is_best = validate_and_record(t, progress.console)
                validation_seconds = time.time() - validation_started
            saved = (every.save_every and state.update % every.save_every == 0) or state.update == t.stop_at or is_best
            if saved:
                t.save(is_best)
            progress.update(task, completed=state.update)
            if state.update < t.stop_at:
                validates_next = every.val_every and (state.update + 1) % every.val_every == 0
                stop_reason = t.stopper.reason_to_stop(validation_seconds if validates_next else 0.0)
                if stop_reason:
                    if not saved:
                        t.save(False)
                    break
    if stop_reason is None and state.update < train.max_updates:
        stop_reason = f"--train.stop_after {train.checkpoint.stop_after}"
    return TrainResult(train.run_dir, state.update, last_loss, state.best_value, 0.0, stop_reason,
                       peak_memory_mb(t.device), rates=t.totals.rates(t.context.world_size, t.peak) if
                       t.totals.computed else {}, peak_source=t.peak_source,
                       epochs=t.plan.epochs_at(state.micro_batches))


def train_step(t: Training, window: LogWindow) -> torch.Tensor:
    """One optimizer update over grad_accum micro-batches; its gradient norm (an update whose norm is not finite
    is skipped, and counted)."""
    train, state = t.train, t.state
    state.window_loss += accumulate_gradients(t, window)
    state.micro_batches += t.plan.per_update(t.context.world_size)
    t.scaler.unscale_(t.optimizer)  # true gradients for clipping (a no-op without fp16)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), train.optimizer.clip_grad or float("inf"))
    if torch.isfinite(grad_norm):  # the same on every rank: gradients are all-reduced first
        t.scaler.step(t.optimizer)
    else:
        state.skipped_updates += 1
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.update += 1
    state.window_updates += 1
    return grad_norm


def accumulate_gradients(t: Training, window: LogWindow) -> float:
    """The gradients of one update, over its grad_accum micro-batches on every rank, and this rank's share of
    its loss. The loss is one objective however the update is split: the sum over all of the update's examples
    (or answer tokens, with token weighting) divided by their number across micro-batches and ranks, all-reduced
    before the first backward; DDP averages the ranks' gradients, so each rank's sum is scaled by the world size."""
    t.model.train()
    batches = []
    for _ in range(t.plan.micro_steps(t.context.world_size)):
        waited = time.time()
        batches.append(next(t.batches))
        window.work.wait += time.time() - waited
        window.work.add(work_of(t.model, t.flops, batches[-1]))
    count = float(sum(t.model.loss_count(batch) for batch in batches))
    [total] = distributed.sum_across_ranks([count], t.device)
    divisor = max(total, 1.0) / t.context.world_size
    loss_share = 0.0
    for micro_step, batch in enumerate(batches):
        batch = move_to(batch, t.device)
        # ranks exchange gradients once per update, after the last micro-batch
        last = micro_step == len(batches) - 1
        with contextlib.nullcontext() if last or t.wrapped is t.model else t.wrapped.no_sync():
            with t.autocast:
                loss = t.forward(batch, reduction="sum") / divisor
            t.scaler.scale(loss).backward()
        loss_share += loss.item()
    return loss_share  # averaged over the ranks when logged: the update's loss


def log_window(t: Training, window: LogWindow, grad_norm: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Log the updates since the last line: the loss averaged over them and over the ranks, and what they
    computed (mellow/train/throughput.py), summed over the ranks."""
    state = t.state
    loss = distributed.mean_across_ranks(state.window_loss / state.window_updates, t.device)
    work = Work(*distributed.sum_across_ranks(window.work.as_list(), t.device))
    t.totals.add(work)
    rates = work.rates(t.context.world_size, t.peak)
    t.tracker.log({"update": state.update, "loss": loss, "lr": t.scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), **rates, "skipped_updates": state.skipped_updates,
                   "peak_memory_mb": peak_memory_mb(t.device)})
    state.window_loss, state.window_updates = 0.0, 0
    return loss, rates


def validate_and_record(t: Training, printer: Console) -> bool:
    """Validate, log and print the scores; whether this update is the best so far by --train.best_metric."""
    state, metric = t.state, t.train.checkpoint.best_metric
    with t.autocast:
        scores = validate(t.model, t.val_set, t.train, t.context, t.device)
    t.tracker.log({"update": state.update, **scores})
    printer.print(f"update {state.update}: " + ", ".join(
        f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items()))
    value = scores[metric]
    is_best = state.best_value is None or (value < state.best_value if metric == "val_loss"
                                           else value > state.best_value)
    state.best_value = value if is_best else state.best_value
    return is_best


@torch.no_grad()
def validate(model: MellowModel, val_set: ExampleSet, train: TrainConfig, context: DistributedContext,
             device: torch.device) -> dict[str, float]:
    """val_loss over the first val_examples validation examples, and val_accuracy (greedy answers to the
    closed-task ones) when it picks the best checkpoint. Ranks take interleaved shares that may differ in size
    (a rank may have none); sums are weighted by examples, so the values equal the one-process ones."""
    model.eval()
    count = len(val_set) if not train.checkpoint.val_examples else min(train.checkpoint.val_examples, len(val_set))
    indices = list(range(count))[context.rank :: context.world_size]
    step = max(1, train.data.batch_size // context.world_size)
    total, examples = 0.0, 0
    for start in range(0, len(indices), step):
        batch = indices[start : start + step]
        total += model(move_to(val_set.batch(batch), device)).item() * len(batch)
        examples += len(batch)
    total, examples = distributed.sum_across_ranks([total, float(examples)], device)
    scores = {"val_loss": total / max(examples, 1.0)}
    if train.checkpoint.best_metric == "val_accuracy":
        closed = [i for i in indices if val_set.examples[i]["task"] in answers.CLOSED_TASKS]
        correct = 0
        for start in range(0, len(closed), step):
            batch = closed[start : start + step]
            generated = model.generate(move_to(val_set.batch(batch, for_generation=True), device), 16,
                                     val_set.tokenizer.eos_token_id)
            texts = val_set.tokenizer.batch_decode(generated, skip_special_tokens=True)
            correct += sum(answers.is_correct(val_set.examples[i], text.strip()) for i, text in zip(batch, texts))
        correct, asked = distributed.sum_across_ranks([float(correct), float(len(closed))], device)
        if asked == 0:
            raise ValueError(f"--train.best_metric val_accuracy: the first {count} validation examples hold no "
                             f"closed-task example ({', '.join(answers.CLOSED_TASKS)}); use val_loss")
        scores["val_accuracy"] = correct / asked
    return scores


def training_precision(model: MellowModel, precision: str, device: torch.device) -> str:
    """`precision` made concrete for `device` (auto: bf16 where the device has native bf16 arithmetic, else fp32),
    with the model set up for it. On a CPU under bf16 the decoder's attention runs eagerly (matmuls and a
    softmax): torch's bf16 SDPA kernel for CPUs took ~4x its fp32 time at the quickstart's shapes, while eager
    attention's matmuls run in bf16 (a quickstart step: 0.40 s in fp32, 0.31 s in bf16 with SDPA, 0.26 s eager)."""
    if precision == "auto":
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_bf16
        precision = "bf16" if native else "fp32"
    if precision == "bf16" and device.type == "cpu":
        model.language_model.set_attn_implementation("eager")
    return precision


def mixed_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision (fp32: none; `training_precision` resolves auto)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    assert precision in ("bf16", "fp16"), f"precision {precision!r} is resolved by training_precision first"
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def report(result: TrainResult, train: TrainConfig) -> None:
    best = f", best {train.checkpoint.best_metric} {result.best_value:.4f}" if result.best_value is not None else ""
    best += f", peak memory {result.peak_memory_mb:.0f} MB"
    last = "nothing left to train" if math.isnan(result.final_loss) else f"last loss {result.final_loss:.4f}"
    if result.rates:
        console.print(f"compute: {describe(result.rates)}" + ("" if "mfu" in result.rates else
                      f" ({result.peak_source})"), highlight=False)
    if result.stop_reason:
        console.print(f"[bold yellow]stopped early[/] ({result.stop_reason}) at update {result.updates} of "
                      f"{train.max_updates} (epoch {result.epochs:.2f}), saved; {last}{best} in "
                      f"{result.seconds:.1f} s. Continue with --resume --train.run_dir {result.run_dir}")
        return
    console.print(f"[bold green]trained[/] {result.run_dir}: {result.updates} updates ({result.epochs:.2f} epochs), "
                  f"{last}{best} "
                  f"in {result.seconds:.1f} s")

