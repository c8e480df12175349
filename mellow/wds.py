"""WebDataset interop, both ways, with the stock `webdataset` reader and writer.

In: audio can live inside WebDataset tars (local, `http(s)://`, or `pipe:<command>`). A dataset's audio
record then names its tar and member (`{"tar": "audio-0003.tar", "member": "clip42.flac", ...}`), and
`01_precompute` streams each tar once per store shard, in a background thread, decoding members from memory.

Out: `export_webdataset` writes a store as tar shards (`<key>.npy` embeddings + `<key>.json` records) that
stream from object stores and HTTP, so a store can be read on machines that do not share a file system. The
fingerprint goes into `meta.json` beside the tars.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Queue
from typing import Union

import webdataset
from webdataset.gopen import Pipe
from webdataset.tariterators import tar_file_expander, url_opener

from mellow.files import write_json_atomic
from mellow.importers import CAPTION_PROMPT, hash_split, label_examples, label_values
from mellow.manifests import is_remote, resolve
from mellow.progress import console, progress_bar
from mellow.store import EmbeddingStore

# Where a clip's audio comes from: a file path or URL for ffmpeg, the bytes of a tar member, or the error
# that kept it from being read (raised when the clip is decoded, so it is reported like any bad clip).
Source = Union[str, bytes, Exception]


def _gopen_http(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """webdataset's curl reader plus a stall limit: a server that accepts the connection and then sends nothing
    would otherwise hang a week-long job forever. After $MELLOW_HTTP_STALL_SECONDS (default 120) under
    1 byte/s, curl gives up (and retries, like any transient error, $MELLOW_HTTP_RETRIES times: default 30,
    as webdataset's); then the tar's unread clips fail with the reason."""
    if mode[0] != "r":
        return _stock_http_opener(url, mode, bufsize)
    stall = os.environ.get("MELLOW_HTTP_STALL_SECONDS", "120")
    retries = os.environ.get("MELLOW_HTTP_RETRIES", "30")
    command = ["curl", "--connect-timeout", "30", "--retry", retries, "--retry-delay", "2", "--speed-limit", "1",
               "--speed-time", stall, "-f", "-s", "-L", url]
    return Pipe(command, mode=mode, bufsize=bufsize, ignore_status=[141, 23])


_stock_http_opener = webdataset.gopen_schemes["http"]
webdataset.gopen_schemes.update(http=_gopen_http, https=_gopen_http)  # webdataset's table for such openers


def sources_of(records: list[dict], root: Path) -> Iterator[tuple[int, dict, Source]]:
    """(position, record, source) for every record. Plain files and URLs come first, in order; then each tar's
    members in the order the tar holds them (each tar is read once, front to back, in a background thread); then
    the rows of Parquet / Arrow shards, the same way."""
    by_tar: dict[str, list[int]] = {}
    in_shards: list[int] = []  # rows of hf: Parquet / Arrow shards
    for position, record in enumerate(records):
        if "tar" in record:
            by_tar.setdefault(record["tar"], []).append(position)
        elif "parquet" in record:
            in_shards.append(position)
        else:
            yield position, record, resolve(record["path"], root)
    if by_tar:
        yield from in_background(_tar_sources(records, by_tar, root), depth=256)
    if in_shards:
        from mellow.hfdata import parquet_sources

        yield from in_background(parquet_sources(records, in_shards, root), depth=256)


def _tar_sources(records: list[dict], by_tar: dict[str, list[int]],
                 root: Path) -> Iterator[tuple[int, dict, Source]]:
    for tar, positions in by_tar.items():
        wanted = {records[position]["member"]: position for position in positions}
        problem = "no such member in the tar"
        try:
            for name, data in read_members(resolve(tar, root), set(wanted)):
                position = wanted.pop(name, None)  # None: a name the tar holds twice
                if position is not None:
                    yield position, records[position], data
        except Exception as error:  # a dead URL, a failing pipe, a corrupt tar: its unread clips fail
            problem = f"reading the tar failed: {error}"
        for name, position in wanted.items():
            yield position, records[position], OSError(f"{tar}: {name}: {problem}")


def read_members(tar: str, names: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a tar, front to back, with webdataset's reader (local path, URL or `pipe:`);
    only `names` if given."""
    streams = url_opener([{"url": tar}])
    select = None if names is None else names.__contains__
    for item in tar_file_expander(streams, select_files=select, eof_value=None):
        yield item["fname"], item["data"]


def in_background(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a thread, up to `depth` items ahead (I/O such as a download overlaps the caller's
    work); its exceptions are raised in the caller."""
    queue: Queue = Queue(depth)
    finished = object()

    def produce() -> None:
        try:
            for item in iterator:
                queue.put((True, item))
        except BaseException as error:  # handed to the consumer, which raises it
            queue.put((False, error))
        queue.put((True, finished))

    threading.Thread(target=produce, daemon=True, name="mellow-reader").start()
    while True:
        ok, item = queue.get()
        if not ok:
            raise item
        if item is finished:
            return
        yield item


def export_webdataset(store_path: Path, out_dir: Path, clips_per_tar: int = 1000) -> list[Path]:
    """Write every successfully encoded clip of the store into `out_dir/shard-NNNNNN.tar`; return the tars.

    Tars are written into a temporary folder and moved into place at the end, so a partial export is never
    mistaken for a complete one."""
    if clips_per_tar < 1:
        raise ValueError(f"--clips-per-tar {clips_per_tar} must be >= 1")
    store = EmbeddingStore(store_path)
    temporary = out_dir / ".partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    records = [record for record in store.index if record["status"] == "ok"]
    embeddings, valid = store.load_all()
    with progress_bar() as progress, webdataset.ShardWriter(str(temporary / "shard-%06d.tar"),
                                                            maxcount=clips_per_tar, verbose=0) as writer:
        task = progress.add_task("exporting", total=len(records))
        for record in records:
            row = record["row"]
            # a one-view store exports (T, D) and an int, a store of V views (V, T, D) and a list of V ints
            emb, counts = (embeddings[row, 0], int(valid[row, 0])) if store.views == 1 else \
                (embeddings[row], valid[row].tolist())
            # webdataset keys end at the first dot, so dots in ids become underscores (the id is in the json)
            writer.write({"__key__": record["id"].replace(".", "_"), "npy": emb, "json": {**record, "valid": counts}})
            progress.advance(task)
    tars = []
    for tar in sorted(temporary.glob("shard-*.tar")):
        tars.append(out_dir / tar.name)
        tar.replace(tars[-1])
    shutil.rmtree(temporary)
    write_json_atomic(out_dir / "meta.json", {**store.meta, "source_store": str(store_path),
                                              "tars": [tar.name for tar in tars]})
    console.print(f"[bold green]exported[/] {len(records)} clips of {store_path} to {len(tars)} tar(s) in {out_dir}")
    return tars


AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "webm", "mka")


def import_webdataset(urls: list[str], val_fraction: float, test_fraction: float,
                      on_sample: Callable[[], None] = lambda: None, label_fields: dict[str, str] | None = None,
                      ) -> tuple[list[dict], dict[str, list[dict]], list[dict], dict[str, list[str]]]:
    """Read WebDataset tars of audio + json (stock reader, one tar at a time) into audio records, examples per
    split, failures (unreadable tars, samples without audio, repeated ids) and the closed-label tasks.

    The audio stays in the tars: a record names its tar and member, and 01_precompute streams them. Per sample,
    the json may give `id` (default: the sample key), `duration`, `split` (train/val/test; default: drawn from
    a hash of the id), captions as `captions` (list), `caption` or `text`, and the fields of `label_fields`
    ({json field: task}: a label, or a list of them), which become closed-label tasks."""
    records: list[dict] = []
    examples: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    failures: list[dict] = []
    seen: set[str] = set()
    labelled: list[tuple[str, str, str, list[str]]] = []
    for url in urls:
        location = url if is_remote(url) else str(Path(url).resolve())
        try:
            for sample in webdataset.WebDataset(location, shardshuffle=False, empty_check=False):
                on_sample()
                record, meta, captions, problem = _sample_record(sample, location, seen, val_fraction,
                                                                 test_fraction)
                if problem:
                    failures.append({"tar": url, "key": sample["__key__"], "reason": problem})
                    continue
                seen.add(record["id"])
                records.append(record)
                for name, task in (label_fields or {}).items():
                    labels = label_values(meta.get(name))
                    if labels:
                        labelled.append((record["split"], record["id"], task, labels))
                if captions:
                    examples[record["split"]].append({
                        "task": "caption", "subtask": "caption", "audio1": record["id"], "audio2": None,
                        "prompt": CAPTION_PROMPT, "answer": captions[0], "references": captions,
                        "split": record["split"]})
        except Exception as error:  # a dead URL, a failing pipe, a corrupt tar: report it, read the others
            failures.append({"tar": url, "key": None, "reason": f"reading the tar failed: {error}"})
    label_tasks, labelled_examples = label_examples(labelled)
    for split, example in labelled_examples:
        examples[split].append({**example, "split": split})
    return records, examples, failures, label_tasks


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
