"""Where a clip's audio bytes come from: a file path or URL (FFmpeg reads it), a member of a WebDataset tar
(each tar streamed once, in a background thread), or a row of a Parquet / Arrow shard (each file read once,
its audio column only). `sources_of` yields every record's source in the order that reads each container once."""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Union

import webdataset
from webdataset.gopen import Pipe
from webdataset.tariterators import tar_file_expander, url_opener

from mellow.manifests import resolve

BATCH_ROWS = 64  # rows read at a time: audio bytes held at once stay a few MB


def arrow_reader(source):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)  # save_to_disk writes the stream format
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def batches(path: Path, columns: list[str], row_groups: list[int] | None = None) -> Iterator:
    """Record batches of `columns`, at most BATCH_ROWS rows each; a Parquet file's `row_groups` only, if given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        with pq.ParquetFile(path) as parquet:
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=row_groups,
                                            use_threads=False)
        return
    with pa.memory_map(str(path)) as source:  # mapped: a batch's bytes are read when touched
        reader = arrow_reader(source)
        for batch in (reader if isinstance(reader, pa.ipc.RecordBatchStreamReader)
                      else (reader.get_batch(i) for i in range(reader.num_record_batches))):
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)


def parquet_sources(records: list[dict], positions: list[int], root: Path) -> Iterator[tuple[int, dict, object]]:
    """(position, record, audio bytes or an OSError) for records naming rows of Parquet / Arrow shards: each file
    read once, front to back, its audio column only, and only the row groups that hold wanted rows."""
    import pyarrow.parquet as pq

    by_file: dict[str, dict[int, int]] = {}
    for position in positions:
        record = records[position]
        by_file.setdefault(record["parquet"], {})[int(record["row"])] = position
    for name, wanted in by_file.items():
        path = Path(name) if Path(name).is_absolute() else root / name
        column = records[next(iter(wanted.values()))]["column"]
        problem = "no such row in the file"
        try:
            groups, row_numbers = None, itertools.count()
            if path.suffix == ".parquet":  # read only the row groups that hold wanted rows
                with pq.ParquetFile(path) as parquet:
                    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
                starts = list(itertools.accumulate([0] + sizes[:-1]))
                groups = sorted({bisect.bisect_right(starts, row) - 1 for row in wanted})
                row_numbers = (row for g in groups for row in range(starts[g], starts[g] + sizes[g]))
            for batch in batches(path, [column], groups):
                for audio in batch.column(0).to_pylist():
                    row = next(row_numbers)
                    position = wanted.pop(row, None)
                    if position is not None:
                        data = audio.get("bytes") if isinstance(audio, dict) else audio
                        yield position, records[position], (data if isinstance(data, bytes) else
                                                             OSError(f"{path}#{row}: no audio bytes in {column}"))
                if not wanted:
                    break
        except Exception as error:  # a damaged, truncated or missing shard: its unread clips fail with why
            problem = f"reading the file failed: {error}"
        for row, position in wanted.items():
            yield position, records[position], OSError(f"{path}#{row}: {problem}")


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
        pass

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

