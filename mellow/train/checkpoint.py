"""Checkpoints of a training run: written atomically, pointed to by latest/best, pruned, resumed exactly.

    <run_dir>/step-000500/
        model.pt          the weights that train (the whole decoder in full mode), and frozen ones that differ
                          from the base decoder (loaded by --init-from)
        optimizer.pt      optimizer, learning-rate scheduler and grad-scaler states
        trainer.json      update, data position (micro-batches consumed), best validation value, world size,
                          resolved config, store fingerprint, training-split hash, and a reference to the
                          base decoder (name + weights hash), so one that is not saved here can be found again
        rng-rank<r>.pt    every rank's random states (python, numpy, torch, cuda) and its partial log window
    <run_dir>/latest.json    -> the newest complete checkpoint; best.json -> the best by the run's best_metric

A checkpoint folder is written under a temporary name and renamed into place; the pointers are written after
it, so a run killed at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mellow import distributed
from mellow.config import from_dict
from mellow.distributed import DistributedContext
from mellow.files import check_free_space, disk_space, read_json, replace_directory, write_json_atomic
from mellow.model.decoders import decoder_reference
from mellow.model.modeling import AudioProjector, MellowModel, build_model
from mellow.progress import console
from mellow.settings import ModelConfig, saved_model_settings
from mellow.store.reader import EmbeddingStore
from mellow.store.writer import StoreMismatchError


@dataclass
class TrainingState:
    """Where a run is: what the loop needs besides the weights and optimizer to continue exactly."""

    update: int = 0
    micro_batches: int = 0  # the position in the data order: global micro-batches, or device batches (batch_tokens)
    best_value: float | None = None  # of the run's best_metric
    skipped_updates: int = 0  # updates whose gradients were not finite, so the optimizer did not step
    # this rank's summed training loss and update count since the last logged row, so that the first row after a
    # resume averages the same updates as an uninterrupted run's (per rank: saved beside its random states)
    window_loss: float = 0.0
    window_updates: int = 0


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, keep_last: int, model: MellowModel, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, state: TrainingState, is_best: bool, context: DistributedContext,
                    meta: dict) -> Path:
    """Write step-NNNNNN/ via a temporary folder (every rank adds its RNG state), then point latest at it.

    A checkpoint that cannot fit is refused before anything is written, and one that fills the disk while it is
    written is removed again (DiskFullError): latest.json keeps pointing to the previous complete one."""
    name = f"step-{state.update:06d}"
    temporary = run_dir / f".{name}.tmp"
    what = f"checkpoint {name} (the older ones are deleted only after it is written)"
    if context.is_main:
        weights = model.checkpoint_state_dict()
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict()}
        needed = tensor_bytes(weights) + tensor_bytes(training_state) + (1 << 20) * context.world_size
        shutil.rmtree(temporary, ignore_errors=True)
        check_free_space(run_dir, what, needed)
        temporary.mkdir(parents=True)
    distributed.barrier()
    try:
        with disk_space(run_dir, what, 1 << 20):
            save_file({**capture_rng(), "log_window": [state.window_loss, state.window_updates]},
                      temporary / f"rng-rank{context.rank}.pt")
        distributed.barrier()
        if context.is_main:
            with disk_space(run_dir, what, needed):
                save_file(weights, temporary / "model.pt")
                save_file(training_state, temporary / "optimizer.pt")
                write_json_atomic(temporary / "trainer.json", {
                    "update": state.update, "micro_batches": state.micro_batches, "best_value": state.best_value,
                    "skipped_updates": state.skipped_updates, "world_size": context.world_size, **meta})
            replace_directory(temporary, run_dir / name)
            write_json_atomic(run_dir / "latest.json", {"path": name, "update": state.update})
            if is_best:
                metric = meta["config"]["train"]["checkpoint"]["best_metric"]
                write_json_atomic(run_dir / "best.json", {"path": name, "update": state.update, "metric": metric,
                                                          "value": state.best_value})
            prune(run_dir, keep_last)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)  # frees what the half-written checkpoint took
        raise
    distributed.barrier()
    return run_dir / name


def save_file(value: object, path: Path) -> None:
    """torch.save, except that a full disk raises OSError(ENOSPC): torch's writer reports it as an unexplained
    RuntimeError ("unexpected pos"), with the file's OSError, when it writes through a Python file, as context."""
    try:
        with open(path, "wb") as handle:
            torch.save(value, handle)
    except RuntimeError as error:
        cause = error.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from error


def tensor_bytes(value: object) -> int:
    """Bytes of every tensor in a (nested) state dict: what torch.save writes, less a little framing."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete numbered checkpoints beyond the newest `keep_last`, never the ones latest or best point to."""
    protected = {read_json(run_dir / f)["path"] for f in ("latest.json", "best.json") if (run_dir / f).exists()}
    numbered = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in numbered[: max(0, len(numbered) - keep_last)]:
        if old.name not in protected:
            shutil.rmtree(old)


def load_checkpoint(checkpoint: Path, model: MellowModel, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, context: DistributedContext, seed: int) -> TrainingState:
    """Load weights, optimizer, scheduler, scaler and this rank's random states; return where the run was.

    At another world size than the checkpoint's, the data order and batches still continue exactly (they do
    not depend on the world size), but ranks have no saved random state of their own: each is seeded from
    (seed, update, rank), which changes dropout from what an uninterrupted run would have drawn."""
    trainer = read_json(checkpoint / "trainer.json")
    check_base_decoder(checkpoint, trainer)
    model.load_checkpoint_state_dict(torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True))
    # the run's own files (it wrote them): the optimizer and random states hold more than tensors
    states = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    scaler.load_state_dict(states["scaler"])
    window = [0.0, 0]  # at another world size the rows after the resume average only the updates since it
    if trainer["world_size"] == context.world_size:
        rank_state = torch.load(checkpoint / f"rng-rank{context.rank}.pt", weights_only=False)
        restore_rng(rank_state)
        window = rank_state.get("log_window", window)
    else:
        reseed = seed * 1_000_003 + trainer["update"] * 101 + context.rank
        random.seed(reseed)
        np.random.seed(reseed % 2**32)
        torch.manual_seed(reseed)
    return TrainingState(trainer["update"], trainer["micro_batches"], trainer["best_value"],
                         trainer["skipped_updates"], *window)


def load_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A model.pt of tensors only, read with weights_only=True: a file from elsewhere (--init-from, export, ask)
    is data, so a pickle in it that would build any other object, and run its code, is refused."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors and containers
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} {path.parent}: {path.name} is not a plain file of tensors, so it is not loaded "
                         f"(nothing in it ran): {first}. Use a checkpoint that mellow saved") from None
    except (OSError, RuntimeError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} {path.parent} cannot be loaded ({type(error).__name__}: {first[:200]}); the file "
                         "is damaged or incomplete: delete this checkpoint folder, or train again from an earlier "
                         "one") from None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ValueError(f"{what} {path.parent}: {path.name} does not hold a dict of tensors")
    return weights


def initialise_from(source: Path, model: MellowModel) -> int:
    """Load the trained weights of another run's checkpoint into a new run's model (fine-tuning; not a resume:
    the optimizer, schedule and data position start afresh). Returns how many tensors were loaded.

    Weights of a decoder layer that this model wraps with a LoRA adapter go into the wrapped base layer."""
    own = model.state_dict()
    loaded = {}
    for key, tensor in load_weights(source / "model.pt", "--train.init_from").items():
        module, _, leaf = key.rpartition(".")
        target = key if key in own else f"{module}.base_layer.{leaf}"
        if target not in own:
            continue
        if own[target].shape != tensor.shape:
            raise ValueError(f"--train.init_from {source}: {key} has shape {tuple(tensor.shape)} there and "
                             f"{tuple(own[target].shape)} in this model; use a checkpoint of the same model shape")
        loaded[target] = tensor
    if not loaded:
        raise ValueError(f"--train.init_from {source}: none of its weights fit this model")
    model.load_state_dict(loaded, strict=False)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    model.frozen_overrides = set(loaded) - trainable  # no longer the base decoder's: checkpoints must hold them
    return len(loaded)


def check_base_decoder(checkpoint: Path, trainer: dict) -> None:
    """A checkpoint that does not hold the decoder's own weights must be loaded onto the same base decoder."""
    model = trainer["config"]["model"]
    if model["decoder_mode"] == "full":
        return  # model.pt holds the whole decoder
    saved = trainer.get("base_decoder", "not recorded (a checkpoint older than mellow's base-decoder check)")
    current = decoder_reference(model["decoder"], trainer["config"]["train"]["seed"])
    if current != saved:
        raise ValueError(f"{checkpoint} holds only the trained parts of a model whose base decoder was {saved}; "
                         f"the decoder found now is {current}. Restore that decoder to load this checkpoint")


def load_trained_model(checkpoint: Path, device: torch.device) -> tuple[MellowModel, object, dict]:
    """Rebuild the model of a checkpoint and load its weights; returns (model, tokenizer, trainer.json)."""
    trainer = read_json(checkpoint / "trainer.json")
    check_base_decoder(checkpoint, trainer)
    model_config = from_dict(ModelConfig, saved_model_settings(trainer["config"]["model"]),
                             f"{checkpoint}/trainer.json model")
    model, tokenizer = build_model(model_config, trainer["store_fingerprint"]["dim"],
                                   seed=trainer["config"]["train"]["seed"])
    model.load_checkpoint_state_dict(load_weights(checkpoint / "model.pt", "checkpoint"))
    return model.to(device).eval(), tokenizer, trainer


def report_world_size_change(saved: int, now: int) -> None:
    console.print(f"[yellow]resuming a run saved by {saved} process(es) with {now}:[/] the data order and the "
                  "examples of every update continue exactly; each process's random state is re-seeded from "
                  "(seed, update, rank), so dropout differs, and gradients are summed in another order: the "
                  "numbers follow an uninterrupted run closely, not bitwise.")


def read_alignment(align_dir: Path) -> dict:
    """align.json of a finished 02_align run folder (it is written last)."""
    if not (align_dir / "align.json").is_file():
        raise ValueError(f"--train.align_from {align_dir}: no align.json there; pass a finished 02_align run folder")
    return read_json(align_dir / "align.json")


def load_aligned_projector(align_dir: Path, projector: AudioProjector, store: EmbeddingStore) -> dict:
    """Load the projector of a finished alignment run into `projector` (03_train --train.align_from), after
    checking it was trained on a store like `store` and for a decoder of the same width."""
    aligned = read_alignment(align_dir)
    store.check_fingerprint(aligned["audio_fingerprint"], f"--train.align_from {align_dir}")
    width = projector.linear1.out_features
    if aligned["width"] != width:
        raise StoreMismatchError(f"--train.align_from {align_dir} aligned a projector for a decoder of width "
                                 f"{aligned['width']}; this run's decoder is {width} wide (align with --decoder "
                                 "set to this run's --model.decoder)")
    projector.load_state_dict(torch.load(align_dir / "align.pt", weights_only=True)["audio_projector"])
    return aligned
