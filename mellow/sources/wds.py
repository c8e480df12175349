"""`wds:<tars>`: WebDataset tars of audio + json, read with the stock `webdataset` reader. The audio stays in
the tars: a dataset's audio record names its tar and member (`{"tar": "audio-0003.tar", "member":
"clip42.flac", ...}`), and 01_precompute streams each tar once per store shard (mellow/audio/sources.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import webdataset
from braceexpand import braceexpand

from mellow.manifests import is_remote
from mellow.progress import progress_bar
from mellow.sources.common import CAPTION_PROMPT, Imported, hash_split, label_values
from mellow.sources.config import PrepareConfig

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "webm", "mka")


def load(location: str, config: PrepareConfig) -> Imported:
    """`wds:<tars>`: index WebDataset tars of audio + json; the audio stays in the tars (01_precompute streams
    it)."""
    urls = [url for pattern in location.split("::") for url in braceexpand(pattern.strip())]
    with progress_bar() as progress:
        task = progress.add_task("reading tars", total=None)
        imported = import_webdataset(urls, config.val_fraction, config.test_fraction,
                                     on_sample=lambda: progress.advance(task), label_fields=config.label_fields())
    imported.read, imported.empty = f"{len(urls)} tar(s)", "the tars are empty"
    return imported


def import_webdataset(urls: list[str], val_fraction: float, test_fraction: float,
                      on_sample: Callable[[], None] = lambda: None, label_fields: dict[str, str] | None = None,
                      ) -> Imported:
    """Read WebDataset tars of audio + json (stock reader, one tar at a time) into audio records, examples per
    split, failures (unreadable tars, samples without audio, repeated ids) and the closed-label tasks.

    The audio stays in the tars: a record names its tar and member, and 01_precompute streams them. Per sample,
    the json may give `id` (default: the sample key), `duration`, `split` (train/val/test; default: drawn from
    a hash of the id), captions as `captions` (list), `caption` or `text`, and the fields of `label_fields`
    ({json field: task}: a label, or a list of them), which become closed-label tasks."""
    imported = Imported()
    seen: set[str] = set()
    for url in urls:
        location = url if is_remote(url) else str(Path(url).resolve())
        try:
            for sample in webdataset.WebDataset(location, shardshuffle=False, empty_check=False):
                on_sample()
                record, meta, captions, problem = _sample_record(sample, location, seen, val_fraction,
                                                                 test_fraction)
                if problem:
                    imported.failures.append({"tar": url, "key": sample["__key__"], "reason": problem})
                    continue
                seen.add(record["id"])
                imported.records.append(record)
                for name, task in (label_fields or {}).items():
                    labels = label_values(meta.get(name))
                    if labels:
                        imported.labelled.append((record["split"], record["id"], task, labels))
                if captions:
                    imported.add(record["split"], {
                        "task": "caption", "subtask": "caption", "audio1": record["id"], "audio2": None,
                        "prompt": CAPTION_PROMPT, "answer": captions[0], "references": captions})
        except Exception as error:  # a dead URL, a failing pipe, a corrupt tar: report it, read the others
            imported.failures.append({"tar": url, "key": None, "reason": f"reading the tar failed: {error}"})
    imported.close_label_tasks()
    return imported


def _sample_record(sample: dict, tar: str, seen: set[str], val_fraction: float,
                   test_fraction: float) -> tuple[dict, dict, list[str], str | None]:
    """(audio record, its json, captions, None) for one WebDataset sample, or ({}, {}, [], reason) if it cannot
    be used."""
    extension = next((ext for ext in AUDIO_EXTENSIONS if ext in sample), None)
    if extension is None:
        return {}, {}, [], f"no audio member ({', '.join(AUDIO_EXTENSIONS)}) among {sorted(sample)}"
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except json.JSONDecodeError as error:
        return {}, {}, [], f"its json does not parse: {error}"
    if not isinstance(meta, dict):
        return {}, {}, [], f"its json is a {type(meta).__name__}, not an object"
    clip_id = str(meta.get("id", sample["__key__"]))
    if clip_id in seen:
        return {}, {}, [], f"id {clip_id!r} was already used by another sample"
    split = meta.get("split")
    if split not in ("train", "val", "test"):
        split = hash_split(clip_id, val_fraction, test_fraction)
    captions = meta.get("captions") or meta.get("caption") or meta.get("text") or []
    captions = [captions] if isinstance(captions, str) else [str(caption) for caption in captions]
    member = f"{sample['__key__']}.{extension}"
    data = sample[extension]
    record = {"id": clip_id, "path": f"{tar}#{member}", "tar": tar, "member": member,
              "duration": meta.get("duration"), "sha256": hashlib.sha256(data).hexdigest(), "split": split}
    return record, meta, captions, None

