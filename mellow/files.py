"""Small file helpers every stage uses: atomic writes, JSON lines, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, value: object) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: Path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def replace_directory(temporary: Path, final: Path) -> None:
    """Move a fully written directory into place (the commit step of an atomic directory write)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(value: object, length: int = 8) -> str:
    """A short stable hash of a JSON-serialisable value (used in fingerprints and folder names)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def hash_model_weights(model_dir: Path) -> str:
    """16 hex digits identifying the weights saved in a model folder (its *.safetensors and *.bin files)."""
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return short_hash([sha256_file(path) for path in files], length=16)


def cache_dir() -> Path:
    """mellow's per-user cache ($MELLOW_CACHE, default ~/.cache/mellow): converted decoders, token caches of
    read-only datasets."""
    return Path(os.environ.get("MELLOW_CACHE", Path.home() / ".cache" / "mellow"))
