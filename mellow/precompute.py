"""Stage 01: decode every clip of a dataset through ffmpeg, run the frozen encoder once, write the store.

Work is done shard by shard; finished shards are skipped on a rerun, so an interrupted run resumes.
Decoding runs in a thread pool (each decode is an ffmpeg subprocess) ahead of the encoder, so the two overlap.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mellow.audio import AudioDecodeError, decode_audio, find_ffmpeg, fit_length
from mellow.config import setting
from mellow.encoders import AudioEncoder, EncoderConfig, build_encoder
from mellow.files import read_jsonl, write_json_atomic
from mellow.progress import console, progress_bar
from mellow.store import StoreConfig, StoreWriter, code_version


class TooManyFailuresError(RuntimeError):
    """More clips failed than --max-failures allows (the store itself is complete and usable)."""


@dataclass
class PrecomputeConfig:
    dataset: Path = setting(Path("datasets/synth"), "Dataset folder made by 00_prepare (holds audio.jsonl).")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    decode_workers: int = setting(0, "Parallel ffmpeg decodes (0: two per CPU core).")
    max_failures: float = setting(0.05, "Exit with an error if more than this fraction of clips fail.")
    min_seconds: float = setting(0.1, "Clips with less audio than this are skipped (reported as failed).")
    rank: int = setting(-1, "This process's part of the work: shards rank, rank+world, ... (-1: from torchrun's "
                            "RANK or SLURM_ARRAY_TASK_ID, else 0).")
    world_size: int = setting(0, "Processes sharing the work (0: from torchrun's WORLD_SIZE or "
                                 "SLURM_ARRAY_TASK_COUNT, else 1).")

    def __post_init__(self) -> None:
        if not (self.dataset / "audio.jsonl").is_file():
            raise ValueError(f"--dataset {self.dataset}: no audio.jsonl there; run 00_prepare first "
                             "or point at a dataset folder")
        if not 0.0 <= self.max_failures <= 1.0:
            raise ValueError(f"--max-failures {self.max_failures} must be a fraction between 0 and 1")
        if self.min_seconds < 0:
            raise ValueError(f"--min-seconds {self.min_seconds} must be >= 0")
        if self.decode_workers < 0:
            raise ValueError(f"--decode-workers {self.decode_workers} must be >= 0")
        rank, world = self.work_split()
        if not 0 <= rank < world:
            raise ValueError(f"--rank {rank} must be in [0, --world-size {world})")

    def work_split(self) -> tuple[int, int]:
        """(rank, world size): explicit flags, else torchrun's variables, else a SLURM job array's, else (0, 1)."""
        if self.world_size > 0:
            return max(self.rank, 0), self.world_size
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if "SLURM_ARRAY_TASK_COUNT" in os.environ:
            task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
            return task, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return max(self.rank, 0), 1


@dataclass
class PrecomputeResult:
    store_path: Path
    computed_shards: int
    skipped_shards: int
    clips: int
    seconds: float


def store_path_for(config: PrecomputeConfig, encoder: AudioEncoder) -> Path:
    return config.store.root / config.dataset.name / encoder.tag()


def run(config: PrecomputeConfig) -> PrecomputeResult:
    """Precompute the store for `config.dataset` and return where it is and what was done."""
    started = time.time()
    records = validate_args(config)
    encoder = build_encoder(config.encoder)
    store_path = store_path_for(config, encoder)
    writer = StoreWriter(store_path, len(records), encoder.fingerprint(), config.store,
                         ids=[record["id"] for record in records])
    result = process(config, encoder, writer, records)
    result.seconds = time.time() - started
    report(config, writer, result)
    return result


def validate_args(config: PrecomputeConfig) -> list[dict]:
    find_ffmpeg()
    records = read_jsonl(config.dataset / "audio.jsonl")
    if not records:
        raise ValueError(f"--dataset {config.dataset}: audio.jsonl lists no clips")
    return records


def process(config: PrecomputeConfig, encoder: AudioEncoder, writer: StoreWriter,
            records: list[dict]) -> PrecomputeResult:
    rank, world = config.work_split()
    mine = range(rank, writer.num_shards, world)
    todo = [shard for shard in mine if not writer.is_done(shard)]
    workers = config.decode_workers or 2 * (os.cpu_count() or 1)
    clips = sum(len(writer.shard_rows(shard)) for shard in todo)
    with progress_bar() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task("encoding clips", total=clips)
        for shard in todo:
            shard_records = [records[row] for row in writer.shard_rows(shard)]
            embeddings, valid, index = encode_shard(config, encoder, pool, shard_records, writer.shard_rows(shard),
                                                    lambda n: progress.advance(task, n))
            writer.write_shard(shard, embeddings, valid, index)
            rate = progress.tasks[task].speed or 0.0
            progress.update(task, status=f"{rate:.1f} clips/s, shard {shard + 1}/{writer.num_shards}")
    return PrecomputeResult(writer.path, len(todo), len(mine) - len(todo), clips, 0.0)


def _decode(record: dict, config: PrecomputeConfig, sample_rate: int) -> tuple[np.ndarray, float]:
    """Decode the part of a clip the crop policy keeps (ffmpeg seeks; the rest is never decoded) and fit it.

    Raises AudioDecodeError for anything unusable: unreadable, empty, digital silence, shorter than
    --min-seconds, or truncated (much shorter than the duration its manifest records)."""
    path = record["path"] if "://" in record["path"] else config.dataset / record["path"]
    clip_seconds = config.encoder.clip_seconds
    duration = record.get("duration")
    offset = 0.0
    if config.encoder.crop == "center" and duration and duration > clip_seconds:
        offset = (duration - clip_seconds) / 2
    waveform = decode_audio(path, sample_rate, offset_seconds=offset, duration_seconds=clip_seconds)
    seconds = waveform.shape[0] / sample_rate
    if float(np.abs(waveform).max()) == 0.0:
        raise AudioDecodeError(f"{path}: all samples are zero (digital silence)")
    if seconds < config.min_seconds:
        raise AudioDecodeError(f"{path}: {seconds:.3f} s of audio, shorter than --min-seconds {config.min_seconds}")
    if duration:
        expected = min(duration - offset, clip_seconds)
        if seconds < 0.9 * expected - 0.05:
            raise AudioDecodeError(f"{path}: truncated: decoded {seconds:.2f} s where the manifest says "
                                   f"{expected:.2f} s")
    return fit_length(waveform, int(round(clip_seconds * sample_rate)), config.encoder.crop)


def _decoded_in_order(pool: ThreadPoolExecutor, records: list[dict], config: PrecomputeConfig,
                      encoder: AudioEncoder) -> Iterator[tuple[dict, Future]]:
    """Yield (record, future) in order while keeping a bounded number of decodes running ahead."""
    ahead: deque[tuple[dict, Future]] = deque()
    limit = 4 * config.encoder.batch_size
    for record in records:
        ahead.append((record, pool.submit(_decode, record, config, encoder.sample_rate)))
        if len(ahead) >= limit:
            yield ahead.popleft()
    yield from ahead


def encode_shard(config: PrecomputeConfig, encoder: AudioEncoder, pool: ThreadPoolExecutor, records: list[dict],
                 rows: range, advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode and encode the clips of one shard; failed clips get zero rows and a reason in the index."""
    tokens, dim = config.encoder.tokens, encoder.dim
    embeddings = np.zeros((len(records), tokens, dim), dtype=np.float16)
    valid = np.zeros(len(records), dtype=np.int16)
    index = [{"id": r["id"], "row": row, "path": r["path"], "duration": r.get("duration"),
              "sha256": r.get("sha256"), "status": "ok"} for r, row in zip(records, rows)]
    batch: list[tuple[int, np.ndarray, float]] = []

    def flush() -> None:
        positions = [position for position, _, _ in batch]
        waves = np.stack([wave for _, wave, _ in batch])
        fractions = np.array([fraction for _, _, fraction in batch])
        embeddings[positions], valid[positions] = encoder.encode(waves, fractions)
        bad = ~np.isfinite(embeddings[positions].astype(np.float32)).all(axis=(1, 2))
        for position in np.array(positions)[bad]:
            embeddings[position], valid[position] = 0, 0
            index[position]["status"] = "failed: encoder output is not finite (NaN/inf)"
        advance(len(batch))
        batch.clear()

    for position, (record, future) in enumerate(_decoded_in_order(pool, records, config, encoder)):
        try:
            wave, fraction = future.result()
        except (AudioDecodeError, OSError, ValueError) as error:
            index[position]["status"] = f"failed: {error}"
            advance(1)
            continue
        batch.append((position, wave, fraction))
        if len(batch) == config.encoder.batch_size:
            flush()
    if batch:
        flush()
    return embeddings, valid, index


def report(config: PrecomputeConfig, writer: StoreWriter, result: PrecomputeResult) -> None:
    """Print what this process did; the process that finds every shard done finalizes the store."""
    rank, world = config.work_split()
    who = f"rank {rank}/{world}: " if world > 1 else ""
    rate = result.clips / result.seconds if result.seconds else 0.0
    done = f"{result.computed_shards} shard(s) computed, {result.skipped_shards} already done; " \
           f"{result.clips} clips in {result.seconds:.1f} s ({rate:.1f} clips/s)"
    if not writer.all_done():
        console.print(f"[bold green]{who}finished its shards[/] of {result.store_path}: {done}. The last process to "
                      f"finish finalizes the store (or run `mellow store finalize {result.store_path}`).")
        return
    counts = finalize_store(writer, config.dataset, result.seconds)
    quiet, console.quiet = console.quiet, False  # whichever rank finalizes says so, not only rank 0
    try:
        console.print(f"[bold green]{who}precomputed[/] {result.store_path}: {counts['ok']} clips ok, "
                      f"{counts['failed']} failed; {done}")
    finally:
        console.quiet = quiet
    check_failures(writer.path, counts, config.max_failures)


def finalize_store(writer: StoreWriter, dataset: Path | str, seconds: float) -> dict:
    """Write the index, meta.json and report.json (with every failed clip); return the counts."""
    meta = writer.finalize({"dataset": str(dataset), "code_version": code_version()})
    counts = meta["counts"]
    failures = [{"id": r["id"], "path": r["path"], "reason": r["status"]}
                for r in read_jsonl(writer.path / "index.jsonl") if r["status"] != "ok"]
    write_json_atomic(writer.path / "report.json", {"store": str(writer.path), "counts": counts,
                                                    "seconds_last_run": round(seconds, 2), "failures": failures})
    for failure in failures[:10]:
        console.print(f"  [yellow]skipped[/] {failure['id']}: {failure['reason']}")
    return counts


def check_failures(store_path: Path, counts: dict, max_failures: float) -> None:
    fraction = counts["failed"] / max(counts["rows"], 1)
    if fraction > max_failures:
        raise TooManyFailuresError(f"{counts['failed']} of {counts['rows']} clips failed ({fraction:.1%}), more "
                                   f"than --max-failures {max_failures:.1%}; see {store_path / 'report.json'}")
