"""WebDataset interop, both ways, with the stock `webdataset` reader and writer.

In: audio can live inside WebDataset tars (local, `http(s)://`, or `pipe:<command>`). A dataset's audio
record then names its tar and member (`{"tar": "audio-0003.tar", "member": "clip42.flac", ...}`), and
`01_precompute` streams each tar once per store shard, in a background thread, decoding members from memory.

Out: `export_webdataset` writes a store as tar shards (`<key>.npy` embeddings + `<key>.json` records) that
stream from object stores and HTTP, so a store can be read on machines that do not share a file system. The
fingerprint goes into `meta.json` beside the tars.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Union

import webdataset
from webdataset.tariterators import tar_file_expander, url_opener

from mellow.files import write_json_atomic
from mellow.progress import console, progress_bar
from mellow.store import EmbeddingStore

# Where a clip's audio comes from: a file path or URL for ffmpeg, the bytes of a tar member, or the error
# that kept it from being read (raised when the clip is decoded, so it is reported like any bad clip).
Source = Union[str, bytes, Exception]


def is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def resolve(location: str, root: Path) -> str:
    """A manifest path or tar location: URLs, pipes and absolute paths as they are, others under `root`."""
    return location if is_remote(location) or Path(location).is_absolute() else str(root / location)


def sources_of(records: list[dict], root: Path) -> Iterator[tuple[int, dict, Source]]:
    """(position, record, source) for every record. Plain files and URLs come first, in order; then each tar's
    members in the order the tar holds them (each tar is read once, front to back, in a background thread)."""
    by_tar: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        if "tar" in record:
            by_tar.setdefault(record["tar"], []).append(position)
        else:
            yield position, record, resolve(record["path"], root)
    if by_tar:
        yield from in_background(_tar_sources(records, by_tar, root), depth=256)


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
