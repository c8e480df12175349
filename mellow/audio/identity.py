"""Whether an audio file still holds what its record says: a stat (size, modification time) first, the sha256
only when those changed. 00_prepare's re-check and 01_precompute's both ask here."""

from __future__ import annotations

import os
from pathlib import Path

from mellow.files import sha256_file
from mellow.manifests import is_remote, resolve


def local_audio_path(record: dict, root: Path) -> Path | None:
    """The local file a record's audio is, or None for audio in a tar, a Parquet shard or at a URL (those
    are identified by the sha256 of their bytes, checked when 00_prepare reads them)."""
    if "tar" in record or "parquet" in record or is_remote(record["path"]):
        return None
    return Path(resolve(record["path"], root))


def file_stat(path: Path) -> tuple[int, int] | None:
    """(bytes, mtime_ns) of a file, or None when it is not there."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def recorded_stat(record: dict) -> tuple[int, int] | None:
    """The (bytes, mtime_ns) a record holds (None: it holds none, or the file was not there)."""
    if record.get("bytes") is None or record.get("mtime_ns") is None:
        return None
    return record["bytes"], record["mtime_ns"]


def stat_fields(record: dict, root: Path) -> dict:
    """The `bytes` and `mtime_ns` of a record's local audio file as it is now (None for both when it is not
    there; nothing for audio in a container or at a URL)."""
    path = local_audio_path(record, root)
    if path is None:
        return {}
    now = file_stat(path)
    return dict(zip(("bytes", "mtime_ns"), now or (None, None)))


def matches_manifest(record: dict, path: Path, now: tuple[int, int] | None, check_audio: bool) -> bool:
    """Whether the file at `path` (of stat `now`) holds the audio whose sha256 the manifest `record` records:
    trusted where its size and modification time are those 00_prepare recorded (unless `check_audio`), hashed
    otherwise. A record without a sha256 cannot be checked."""
    if now is None or not record.get("sha256"):
        return True
    if now == recorded_stat(record) and not check_audio:
        return True
    return sha256_file(path) == record["sha256"]


def audio_verdict(stored: dict, manifest: dict, root: Path,
                  check_audio: bool) -> tuple[str, Path | None, tuple[int, int] | None]:
    """What to do with a committed clip, from the record it was encoded from (`stored`, in its shard's marker),
    audio.jsonl's record (`manifest`) and a stat of its file now; with the file and that stat:

    same: nothing changed (or nothing can be checked: a container, a URL, no sha256, a store made before stats
    were recorded and no `check_audio`); re-encode: audio.jsonl records other audio than was encoded (00_prepare
    re-checked it); gone: the file is not here (its embedding stays as encoded); hash: only the file's sha256
    can tell (its size or modification time changed, or `check_audio`): see hashed_verdict."""
    if stored.get("sha256") and manifest.get("sha256") and stored["sha256"] != manifest["sha256"]:
        return "re-encode", None, None
    path = local_audio_path(manifest, root)
    if path is None or not manifest.get("sha256") or ("bytes" not in stored and not check_audio):
        return "same", None, None
    now = file_stat(path)
    if now is None:
        return ("gone" if recorded_stat(stored) else "same"), path, None
    if now == recorded_stat(stored) and not check_audio:
        return "same", path, now
    return "hash", path, now


def hashed_verdict(stored: dict, manifest: dict, path: Path, now: tuple[int, int]) -> str:
    """audio_verdict's answer once the file is hashed. refuse: it holds audio that audio.jsonl does not record
    (edited after 00_prepare); re-encode: it was missing when the clip was encoded (a failed clip) and is back;
    touched: rewritten or copied, the same audio (its new stat is to be recorded); same."""
    if sha256_file(path) != manifest["sha256"]:
        return "refuse"
    if recorded_stat(stored) is None and "bytes" in stored:
        return "re-encode"
    return "same" if now == recorded_stat(stored) else "touched"

