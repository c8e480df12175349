"""`mellow store export-wds`: a store as WebDataset tar shards (`<key>.npy` embeddings + `<key>.json` records)
that stream from object stores and HTTP, so a store can be read on machines that do not share a file system.
The fingerprint goes into `meta.json` beside the tars."""

from __future__ import annotations

import shutil
from pathlib import Path

import webdataset

from mellow.files import write_json_atomic
from mellow.progress import console, progress_bar
from mellow.store.reader import EmbeddingStore


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

