"""Small file helpers every stage uses: atomic writes, JSON lines, hashing, and a full disk said clearly."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 1e5 else f"{count:,} bytes"


class DiskFullError(OSError):
    """No space left where mellow writes: the message names the folder, what was being written, the bytes it
    needs and the bytes free, and says that what was committed before is kept."""

    def __init__(self, folder: Path, what: str, needed: int) -> None:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
        self.folder, self.needed, self.free = Path(folder), needed, free
        super().__init__(errno.ENOSPC, f"no space left in {folder}: {what} needs about {megabytes(needed)} and "
                                       f"{megabytes(free)} are free. Everything written before it is kept; free "
                                       "some space (or choose another folder) and run the same command again")

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def disk_space(folder: Path, what: str, needed: int) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into a DiskFullError that says `what` needed
    `needed` bytes in `folder`; the caller cleans up what the block left half written."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as error:
        if error.errno in DISK_FULL:
            raise DiskFullError(folder, what, needed) from error
        raise


def check_free_space(folder: Path, what: str, needed: int) -> None:
    """Refuse, before writing anything, a write of `needed` bytes that cannot fit in `folder`."""
    if shutil.disk_usage(folder).free < needed:
        raise DiskFullError(folder, what, needed)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_space(path.parent, path.name, len(text.encode())), open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
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

