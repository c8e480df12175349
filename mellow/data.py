"""Examples joined with store embeddings, tokenised once, and batched for training or generation.

The store is read whole into RAM (float16) with sequential shard reads; the quickstart store is ~15 MB.
A store with several views (crops) per clip gives each clip a random view per training epoch, drawn from
(seed, epoch) alone so a resumed run sees the same ones; evaluation always uses the first view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mellow.files import read_jsonl
from mellow.progress import console
from mellow.store import EmbeddingStore


def load_examples(dataset: Path, split: str) -> list[dict]:
    path = dataset / f"{split}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in dataset.glob("*.jsonl") if p.stem != "audio")
        raise ValueError(f"split {split!r} not found in {dataset} (no {path.name}); available: {available}")
    return read_jsonl(path)


@dataclass
class EncodedExample:
    row1: int
    row2: int  # -1 when the example has one audio
    prompt_ids: list[int]
    answer_ids: list[int]


class ExampleSet:
    """The examples of one split whose audio is in the store, with the store's embeddings in memory."""

    def __init__(self, examples: list[dict], store: EmbeddingStore, tokenizer, max_text_tokens: int,
                 embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        kept = [e for e in examples if e["audio1"] in store.rows and (e.get("audio2") is None
                                                                        or e["audio2"] in store.rows)]
        if len(kept) < len(examples):
            console.print(f"[yellow]skipping {len(examples) - len(kept)} example(s) whose audio failed "
                          f"to encode or is not in the store")
        self.examples = kept
        if embeddings is None:
            emb, valid = store.load_all()
            embeddings = torch.from_numpy(emb), torch.from_numpy(valid.astype("int64"))
        self.embeddings, self.valid = embeddings  # (N, V, T, D) float16, (N, V)
        self.view_counts = (self.valid > 0).sum(dim=1).clamp(min=1)  # (N,) views each clip has
        self._views: tuple[int | None, torch.Tensor] = (None, torch.zeros(len(self.valid), dtype=torch.long))
        prompts = tokenizer([e["prompt"] + "\n" for e in kept], add_special_tokens=False)["input_ids"]
        answers = tokenizer([e["answer"] for e in kept], add_special_tokens=False)["input_ids"]
        self.items = []
        for example, prompt, answer in zip(kept, prompts, answers):
            answer = answer[: max_text_tokens // 2] + [tokenizer.eos_token_id]
            prompt = prompt[-(max_text_tokens - len(answer)) :]
            row2 = store.rows[example["audio2"]] if example.get("audio2") else -1
            self.items.append(EncodedExample(store.rows[example["audio1"]], row2, prompt, answer))

    def __len__(self) -> int:
        return len(self.items)

    def views_of_epoch(self, epoch: int | None) -> torch.Tensor:
        """The view of every clip (N,) used in training epoch `epoch`; the first view for epoch None."""
        if epoch is None or self.embeddings.shape[1] == 1:
            return torch.zeros(len(self.valid), dtype=torch.long)
        if self._views[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._views = (epoch, (torch.rand(len(self.valid), generator=generator) * self.view_counts).long())
        return self._views[1]

    def _audio(self, rows: list[int], epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor([max(row, 0) for row in rows])
        views = self.views_of_epoch(epoch)[index]
        return self.embeddings[index, views].float(), self.valid[index, views]  # (B, T, D), (B,)

    def batch(self, indices: list[int], for_generation: bool = False,
              epoch: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors for `indices`. Training: prompt+answer right-padded, labels on the answer, audio views of
        `epoch`. Generation: prompt only, left-padded so every row ends where decoding starts."""
        items = [self.items[i] for i in indices]
        audio1, valid1 = self._audio([item.row1 for item in items], epoch)
        audio2, valid2 = self._audio([item.row2 for item in items], epoch)
        texts = [item.prompt_ids if for_generation else item.prompt_ids + item.answer_ids for item in items]
        width = max(len(text) for text in texts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        text_mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, (item, text) in enumerate(zip(items, texts)):
            start = width - len(text) if for_generation else 0
            input_ids[row, start : start + len(text)] = torch.tensor(text)
            text_mask[row, start : start + len(text)] = 1
            if not for_generation:
                answer_start = len(item.prompt_ids)
                labels[row, answer_start : len(text)] = torch.tensor(item.answer_ids)
        return {"audio1": audio1, "audio1_valid": valid1, "audio2": audio2, "audio2_valid": valid2,
                "has_audio2": torch.tensor([item.row2 >= 0 for item in items]), "input_ids": input_ids,
                "text_mask": text_mask, "labels": labels}


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
