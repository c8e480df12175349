"""Stage 02 (optional): warm-start the audio projector, CLAP-style, against caption embeddings.

Reads only the two stores: the audio store (01_precompute) and the caption store (01_precompute_captions, one
sentence embedding per caption). The audio projector 03_train will use (same shape: encoder width -> decoder
width) maps each clip's tokens; their mean over the valid tokens goes through a linear head to the sentence
space, and a symmetric InfoNCE loss with a learned temperature pulls each clip towards its own captions and away
from the others of the batch. The head is thrown away; `03_train --train.align_from <run>` starts from the
projector. Writes into `--run-dir`:

    align.pt              the projector's and the head's weights
    align.json            the config, both stores' fingerprints, the decoder width, losses and retrieval scores
    metrics.jsonl         training loss and validation retrieval every --val-every updates
    retrieval-<split>.json  audio->text and text->audio R@1/5/10 and mAP@10 on --eval-split, with chance levels

A finished run with the same config is skipped; an interrupted one (a few minutes of work) starts again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mellow.config import describe_differences, to_dict
from mellow.distributed import resolve_device
from mellow.files import disk_space, read_json, write_json_atomic, write_jsonl_atomic
from mellow.model.modeling import AudioProjector
from mellow.progress import console, progress_bar
from mellow.settings import AlignConfig
from mellow.store.reader import EmbeddingStore, dataset_of
from mellow.train.checkpoint import save_file, tensor_bytes
from mellow.train.data import load_examples


class AlignmentModel(nn.Module):
    """The projector 03_train will start from, a masked mean over tokens, and a head to the sentence space."""

    def __init__(self, audio_dim: int, width: int, text_dim: int, dropout: float, temperature: float) -> None:
        super().__init__()
        self.audio_projector = AudioProjector(audio_dim, width, dropout)
        self.head = nn.Linear(width, text_dim)
        self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def embed_audio(self, audio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens with (B,) valid counts -> (B, text_dim) unit vectors."""
        projected = self.audio_projector(audio)  # (B, T, H)
        mask = (torch.arange(audio.shape[1], device=audio.device)[None] < valid[:, None]).float()  # (B, T)
        pooled = (projected * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, H)
        return F.normalize(self.head(pooled), dim=-1)

    def loss(self, audio: torch.Tensor, valid: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE: clip i's caption is the positive of row i and column i."""
        logits = self.embed_audio(audio, valid) @ text.T * self.log_inverse_temperature.clamp(max=math.log(100)).exp()
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@dataclass
class SplitData:
    """One split in memory: each clip's tokens and valid count, and its captions' embeddings."""

    audio: torch.Tensor  # (N, T, D) float32, first view
    valid: torch.Tensor  # (N,)
    captions: list[torch.Tensor]  # per clip: (k, text_dim) unit vectors
    clip_ids: list[str]


def run(config: AlignConfig) -> dict:
    """Train (unless a finished run with this config exists) and return align.json's content."""
    started = time.time()
    if config.dataset is None:
        config = dataclasses.replace(config, dataset=dataset_of(config.store, "--dataset"))
        console.print(f"dataset {config.dataset} (from the audio store's meta.json; --dataset sets another)",
                      highlight=False)
    audio_store, caption_store, width, finished = validate_args(config)
    if finished is not None:
        console.print(f"[green]{config.run_dir} is already aligned with this config; skipping")
        return finished
    data = AlignmentData(audio_store, caption_store)
    splits = {split: data.split(config.dataset, split) for split in dict.fromkeys(("train", "val", config.eval_split))}
    result = fit(config, splits, audio_store, caption_store, width)
    report(config, result, time.time() - started)
    return result


def validate_args(config: AlignConfig) -> tuple[EmbeddingStore, EmbeddingStore, int, dict | None]:
    """The two stores, the decoder width, and align.json if a run with this config already finished."""
    for option, path, stage in (("--store", config.store, "01_precompute"),
                                ("--captions", config.captions, "01_precompute_captions")):
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{option} {str(path)!r} is not a store; pass the folder {stage} made "
                                    "(shards/<dataset>/<tag>)")
    audio_store, caption_store = EmbeddingStore(config.store), EmbeddingStore(config.captions)
    if audio_store.fingerprint.get("kind") == "text" or caption_store.fingerprint.get("kind") != "text":
        raise ValueError(f"--store must be an audio store and --captions a caption store (01_precompute_captions); "
                         f"got {config.store} and {config.captions}")
    if audio_store.meta.get("dataset") != caption_store.meta.get("dataset"):
        console.print(f"[yellow]note:[/] the stores were made from different dataset folders "
                      f"({audio_store.meta.get('dataset')} and {caption_store.meta.get('dataset')}); clips are "
                      "matched by id")
    finished = read_json(config.run_dir / "align.json") if (config.run_dir / "align.json").exists() else None
    if finished is not None and finished["config"] != _settings(config):
        if not config.overwrite:
            differences = "\n  ".join(describe_differences(finished["config"], _settings(config)))
            raise ValueError(f"{config.run_dir} holds an alignment made with another config:\n  {differences}\n"
                             "use another --run-dir, or --overwrite to replace it")
        finished = None
    return audio_store, caption_store, decoder_width(config.decoder, config.tiny_hidden), finished


def _settings(config: AlignConfig) -> dict:
    values = to_dict(config)
    for key in ("device", "overwrite", "run_dir"):
        values.pop(key)
    return values


def decoder_width(decoder: str, tiny_hidden: int) -> int:
    """The embedding width of a decoder, from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    from mellow.model.decoders import decoder_folder
    from mellow.settings import validate_decoder_name

    validate_decoder_name(decoder)
    if decoder == "tiny":
        return tiny_hidden
    model_config = AutoConfig.from_pretrained(decoder_folder(decoder))
    return getattr(model_config, "hidden_size", None) or model_config.n_embd


class AlignmentData:
    """Both stores in memory, read once: every clip's first view and every caption's unit vector."""

    def __init__(self, audio_store: EmbeddingStore, caption_store: EmbeddingStore) -> None:
        self.audio_rows = audio_store.rows
        self.emb, self.valid = audio_store.load_all()  # (N, V, T, D), (N, V)
        self.text = F.normalize(torch.from_numpy(caption_store.emb[:][:, 0].astype(np.float32)), dim=-1)  # (M, E)
        self.caption_rows: dict[str, list[int]] = {}
        for record in caption_store.index:
            if record["status"] == "ok":
                self.caption_rows.setdefault(record["clip"], []).append(record["row"])

    def split(self, dataset: Path, split: str) -> SplitData:
        """The clips of `split` (those its caption examples name) that both stores hold, with their captions."""
        clips = list(dict.fromkeys(example["audio1"] for example in load_examples(dataset, split)
                                   if example["task"] == "caption"))
        audio_rows = self.audio_rows.lookup(clips).tolist()  # -1: not in the audio store
        pairs = [(clip, row) for clip, row in zip(clips, audio_rows) if row >= 0 and clip in self.caption_rows]
        clips, rows = [clip for clip, _ in pairs], [row for _, row in pairs]
        if len(clips) < 2:
            raise ValueError(f"split {split}: {len(clips)} clip(s) with both audio and caption embeddings; alignment "
                             "needs at least 2 (are the stores made from --dataset?)")
        return SplitData(torch.from_numpy(self.emb[rows, 0].astype(np.float32)),
                         torch.from_numpy(self.valid[rows, 0].astype(np.int64)),
                         [self.text[self.caption_rows[clip]] for clip in clips], clips)


def fit(config: AlignConfig, splits: dict[str, SplitData], audio_store: EmbeddingStore,
        caption_store: EmbeddingStore, width: int) -> dict:
    torch.manual_seed(config.seed)
    device = torch.device(resolve_device(config.device))
    train = splits["train"]
    model = AlignmentModel(audio_store.dim, width, caption_store.dim, config.projector_dropout,
                           config.temperature).to(device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: _lr_factor(update, config))
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, len(train.clip_ids))
    order, position, history = torch.randperm(len(train.clip_ids), generator=generator), 0, []
    with progress_bar() as progress:
        task = progress.add_task("aligning", total=config.updates)
        for update in range(1, config.updates + 1):
            if position + batch_size > len(order):  # a new epoch: every clip once per epoch, no clip twice a batch
                order, position = torch.randperm(len(train.clip_ids), generator=generator), 0
            clips = order[position : position + batch_size].tolist()
            position += batch_size
            text = torch.stack([train.captions[c][torch.randint(len(train.captions[c]), (1,), generator=generator)[0]]
                                for c in clips])
            model.train()
            loss = model.loss(train.audio[clips].to(device), train.valid[clips].to(device), text.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            row = {"update": update, "loss": loss.item(), "temperature": 1 / model.log_inverse_temperature.exp().item()}
            if (config.val_every and update % config.val_every == 0) or update == config.updates:
                row["val"] = retrieval_scores(model, splits["val"], device)
            history.append(row)
            progress.update(task, advance=1, status=f"loss {loss.item():.3f}")
    return save(config, model, splits, history, audio_store, caption_store, width, device)


def _lr_factor(update: int, config: AlignConfig) -> float:
    if update < config.warmup_updates:
        return (update + 1) / config.warmup_updates
    progress = (update - config.warmup_updates) / max(1, config.updates - config.warmup_updates)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def retrieval_scores(model: AlignmentModel, data: SplitData, device: torch.device) -> dict[str, float]:
    """Audio->text (relevant: the clip's captions) and text->audio (relevant: its clip) R@1/5/10 and mAP@10 over
    every clip and caption of the split, with the chance level of R@1."""
    model.eval()
    audio = model.embed_audio(data.audio.to(device), data.valid.to(device)).cpu()  # (N, E)
    text = torch.cat(data.captions)  # (M, E)
    owner = torch.cat([torch.full((len(c),), i) for i, c in enumerate(data.captions)])  # (M,) clip of each caption
    similarity = audio @ text.T  # (N, M)
    scores = {}
    relevant = owner[similarity.argsort(dim=1, descending=True)] == torch.arange(len(audio))[:, None]  # (N, M)
    hits = relevant[:, :10].float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)  # a split may have fewer than 10 captions
    counts = torch.bincount(owner, minlength=len(audio)).clamp(max=10).float()
    for k in (1, 5, 10):
        scores[f"audio_to_text_R@{k}"] = relevant[:, :k].any(1).float().mean().item()
    scores["audio_to_text_mAP@10"] = ((precision * hits).sum(1) / counts).mean().item()
    rank = (similarity.T.argsort(dim=1, descending=True) == owner[:, None]).float().argmax(1) + 1  # (M,) 1-based
    for k in (1, 5, 10):
        scores[f"text_to_audio_R@{k}"] = (rank <= k).float().mean().item()
    scores["text_to_audio_mAP@10"] = torch.where(rank <= 10, 1.0 / rank, torch.zeros(())).mean().item()
    scores["text_to_audio_R@1_chance"] = 1 / len(audio)
    scores.update(clips=len(audio), captions=len(text))
    return scores


def save(config: AlignConfig, model: AlignmentModel, splits: dict[str, SplitData], history: list[dict],
         audio_store: EmbeddingStore, caption_store: EmbeddingStore, width: int, device: torch.device) -> dict:
    """Weights first, then align.json, which marks the run finished."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    evaluation = retrieval_scores(model, splits[config.eval_split], device)
    temporary = config.run_dir / ".align.pt.tmp"
    weights = {"audio_projector": model.audio_projector.state_dict(), "head": model.head.state_dict(),
               "log_inverse_temperature": model.log_inverse_temperature.detach().cpu()}
    try:
        with disk_space(config.run_dir, "align.pt", tensor_bytes(weights)):
            save_file(weights, temporary)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(config.run_dir / "align.pt")
    write_jsonl_atomic(config.run_dir / "metrics.jsonl", history)
    write_json_atomic(config.run_dir / f"retrieval-{config.eval_split}.json", evaluation)
    result = {"config": _settings(config), "audio_store": str(config.store), "captions_store": str(config.captions),
              "audio_fingerprint": audio_store.fingerprint, "captions_fingerprint": caption_store.fingerprint,
              "width": width, "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
              "retrieval": {config.eval_split: evaluation}}
    write_json_atomic(config.run_dir / "align.json", result)
    return result


def report(config: AlignConfig, result: dict, seconds: float) -> None:
    scores = result["retrieval"][config.eval_split]
    console.print(f"[bold green]aligned[/] {config.run_dir} in {seconds:.0f} s: loss {result['first_loss']:.3f} -> "
                  f"{result['last_loss']:.3f}; {config.eval_split} retrieval over {scores['clips']} clips and "
                  f"{scores['captions']} captions:")
    for direction in ("audio_to_text", "text_to_audio"):
        values = ", ".join(f"{name} {scores[f'{direction}_{name}']:.3f}" for name in ("R@1", "R@5", "R@10", "mAP@10"))
        console.print(f"  {direction.replace('_', ' ')}: {values}")
    console.print(f"  (chance R@1 text to audio: {scores['text_to_audio_R@1_chance']:.3f}); warm-start 03_train "
                  f"with --train.align_from {config.run_dir}")

