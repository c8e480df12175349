"""Manifests are data, never code: every record read from a dataset is checked before anything uses it.

A dataset's `audio.jsonl` and `<split>.jsonl` travel between machines with the stores, so a line in them may
come from anyone. Each line must be a JSON object of the expected shape (else one error naming file and line),
and an audio location is a local path or an http(s) URL: a `pipe:<command>` location runs a shell command, so it
is honoured only where the user gave that command on 00_prepare's command line (recorded in prepare.json) or
passes --allow-pipes; any other scheme (file://, ftp://, s3://, ...) is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand

DATASETS_ROOT = Path(os.environ.get("MELLOW_DATASETS") or "datasets")  # where 00_prepare writes datasets


class ManifestError(ValueError):
    """A line of a manifest is not a valid record; the message names file and line."""


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON-lines file, streamed."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                yield line_number, parse_json_line(line, f"{path}:{line_number}")


def parse_json_line(line: str | bytes, where: str) -> dict:
    """The JSON object on one line of a JSON-lines file; a ManifestError naming `where` if it is not one."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{where}: not a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: a record must be a JSON object, not {type(value).__name__}")
    return value


def check_example(example: dict, where: str) -> dict:
    """`example` if it is an example record (audio1, prompt and answer strings; audio2 a string or null)."""
    for key in ("audio1", "prompt", "answer"):
        if not isinstance(example.get(key), str):
            raise ManifestError(f"{where}: {key!r} must be a string (got {example.get(key)!r})")
    if example.get("audio2") is not None and not isinstance(example["audio2"], str):
        raise ManifestError(f"{where}: 'audio2' must be a clip id or null (got {example['audio2']!r})")
    return example


def is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def resolve(location: str, root: Path) -> str:
    """A manifest path or tar location: URLs, pipes and absolute paths as they are, others under `root`."""
    return location if is_remote(location) or Path(location).is_absolute() else str(root / location)


def recorded_pipes(dataset: Path) -> set[str]:
    """The `pipe:` tar locations the user gave 00_prepare on its command line (prepare.json keeps its --source)."""
    try:
        source = json.loads((dataset / "prepare.json").read_text())["config"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(source, str) or not source.startswith("wds:"):
        return set()
    return {url.strip() for pattern in source[4:].split("::") for url in braceexpand(pattern.strip())
            if url.strip().startswith("pipe:")}


def check_location(value: object, where: str, key: str, allowed_pipes: set[str] | None) -> str:
    """`value` if it is a place audio may be read from (None for allowed_pipes: every pipe is allowed)."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: {key!r} must be a non-empty string (got {value!r})")
    if value.startswith("pipe:"):
        if allowed_pipes is None or value in allowed_pipes:
            return value
        raise ManifestError(f"{where}: {key} {value[:80]!r} is a shell command, and a manifest is data: it was not "
                            "given to 00_prepare on this dataset's command line, so it does not run. Pass "
                            "--allow-pipes if you trust this dataset")
    scheme = value.partition("://")[0].lower() if "://" in value else None
    if scheme is not None and scheme not in ("http", "https"):
        raise ManifestError(f"{where}: {key} {value[:80]!r}: only local paths and http(s):// URLs are read, not "
                            f"{scheme}://")
    return value


def read_audio_records(dataset: Path, allow_pipes: bool = False) -> list[dict]:
    """The records of `dataset/audio.jsonl`, each checked: an `id` string met once, and a `path` that
    check_location accepts, or a `tar` it accepts with a `member` (and a `path` naming both), or a local `parquet`
    shard with a `row` and a `column`; `duration` and
    `start` numbers or null."""
    path = dataset / "audio.jsonl"
    allowed = None if allow_pipes else recorded_pipes(dataset)
    records, first_line = [], {}
    for line_number, record in json_lines(path):
        where = f"{path}:{line_number}"
        clip_id = record.get("id")
        if not isinstance(clip_id, str) or not clip_id:
            raise ManifestError(f"{where}: 'id' must be a non-empty string (got {clip_id!r})")
        if clip_id in first_line:
            raise ManifestError(f"{where}: id {clip_id!r} is already used on line {first_line[clip_id]}")
        first_line[clip_id] = line_number
        if "tar" in record:  # its path, <tar>#<member>, only names it
            check_location(record["tar"], where, "tar", allowed)
            if not isinstance(record.get("member"), str) or not isinstance(record.get("path"), str):
                raise ManifestError(f"{where}: a record with 'tar' needs 'member' and 'path' strings (got "
                                    f"{record.get('member')!r}, {record.get('path')!r})")
        elif "parquet" in record:  # a row of an hf: shard; its path, <file>#<row>, only names it
            if (not isinstance(record["parquet"], str) or not record["parquet"] or "://" in record["parquet"]
                    or record["parquet"].startswith("pipe:")):
                raise ManifestError(f"{where}: 'parquet' must be a local file path (got {record['parquet']!r})")
            row, column = record.get("row"), record.get("column")
            if isinstance(row, bool) or not isinstance(row, int) or row < 0 or not isinstance(column, str):
                raise ManifestError(f"{where}: a record with 'parquet' needs a 'row' number >= 0 and a 'column' "
                                    f"string (got {row!r}, {column!r})")
        else:
            check_location(record.get("path"), where, "path", allowed)
        for key in ("duration", "start"):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ManifestError(f"{where}: {key!r} must be a number of seconds or null (got {value!r})")
        records.append(record)
    return records


def label_tasks_of(dataset: Path) -> dict[str, list[str]]:
    """The closed-label tasks a prepared dataset declares in its prepare.json ({task: labels}; empty if none)."""
    path = Path(dataset) / "prepare.json"
    if not path.is_file():
        return {}
    declared = json.loads(path.read_text()).get("label_tasks") or {}
    if not isinstance(declared, dict) or not all(isinstance(labels, list) and labels and
                                                 all(isinstance(label, str) for label in labels)
                                                 for labels in declared.values()):
        raise ManifestError(f"{path}: label_tasks must map each task to a list of label strings")
    return declared

