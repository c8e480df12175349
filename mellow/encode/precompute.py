"""Stage 01: decode every clip of a dataset through ffmpeg, run the frozen encoder once, write the store.

Work is done shard by shard; finished shards are skipped on a rerun, so an interrupted run resumes.
Decoding runs in parallel ffmpeg processes (driven from a thread pool) ahead of the batched encoder, so the
two overlap. Audio comes from files, URLs, or members of WebDataset tars (streamed once per shard).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mellow.audio.decode import AudioDecodeError, find_ffmpeg
from mellow.audio.identity import (
    audio_verdict,
    hashed_verdict,
    local_audio_path,
    matches_manifest,
    recorded_stat,
    stat_fields,
)
from mellow.audio.sources import Source, sources_of
from mellow.audio.views import decode_views
from mellow.config import describe_differences
from mellow.encode.encoders import AudioEncoder, build_encoder
from mellow.encode.jobs import PrecomputeResult, report
from mellow.manifests import read_audio_records
from mellow.progress import console, progress_bar
from mellow.settings import PrecomputeConfig
from mellow.sources.config import prepare_command
from mellow.store.reader import recorded_fingerprint
from mellow.store.writer import StoreMismatchError, StoreWriter


def store_path_for(config: PrecomputeConfig, encoder: AudioEncoder) -> Path:
    return config.store.root / config.dataset.name / encoder.tag()


def run(config: PrecomputeConfig) -> PrecomputeResult:
    """Precompute the store for `config.dataset` and return where it is and what was done."""
    started = time.time()
    records = validate_args(config)
    encoder = build_encoder(config.encoder)
    check_like(config, encoder)
    store_path = store_path_for(config, encoder)
    writer = StoreWriter(store_path, len(records), encoder.fingerprint(), config.store, manifest=records)
    reencoded = recheck_audio(config, writer, records)
    result = process(config, encoder, writer, records, reencoded)
    result.seconds = time.time() - started
    report(config, writer, result)
    return result


def check_like(config: PrecomputeConfig, encoder: AudioEncoder) -> None:
    """With --like: the encoder built here must make stores of the fingerprint that one records (the settings are
    taken from it; its weights, sample rate and width must be the same too)."""
    if config.like is None:
        return
    differences = describe_differences({"views": 1, **recorded_fingerprint(config.like)}, encoder.fingerprint())
    if differences:
        raise StoreMismatchError(f"--like {config.like}: the encoder found here would make a store that differs from "
                                 "the one the model expects:\n  " + "\n  ".join(differences))
    console.print(f"encoder settings from --like {config.like}: {encoder.tag()}", highlight=False)


def validate_args(config: PrecomputeConfig) -> list[dict]:
    find_ffmpeg()
    records = read_audio_records(config.dataset, config.allow_pipes)
    if not records:
        raise ValueError(f"--dataset {config.dataset}: audio.jsonl lists no clips")
    return records


def process(config: PrecomputeConfig, encoder: AudioEncoder, writer: StoreWriter, records: list[dict],
            reencoded: frozenset[str] = frozenset()) -> PrecomputeResult:
    """Compute this process's shards that are not done; `reencoded`: clips whose audio changed, each hashed
    before it is encoded again."""
    todo, skipped = config.my_shards(writer)
    workers = config.decode_workers or 2 * (os.cpu_count() or 1)
    clips = sum(len(writer.shard_rows(shard)) for shard in todo)
    computed, encoded = 0, 0
    with progress_bar() as progress, ThreadPoolExecutor(workers) as pool, encoder_threads(encoder):
        task = progress.add_task("encoding clips", total=clips)
        for shard in todo:
            rows = writer.shard_rows(shard)
            with writer.claim(shard) as mine:
                if not mine:  # another process (a second run started by mistake) computes or computed it
                    skipped += 1
                    progress.advance(task, len(rows))
                    continue
                embeddings, valid, index = encode_shard(config, encoder, pool, [records[row] for row in rows],
                                                        rows, lambda n: progress.advance(task, n), reencoded)
                writer.write_shard(shard, embeddings, valid, index)
            computed, encoded = computed + 1, encoded + len(rows)
            rate = progress.tasks[task].speed or 0.0
            progress.update(task, status=f"{rate:.1f} clips/s, shard {shard + 1}/{writer.num_shards}")
    return PrecomputeResult(writer.path, computed, skipped, encoded, 0.0)


def recheck_audio(config: PrecomputeConfig, writer: StoreWriter, records: list[dict]) -> frozenset[str]:
    """Before computing, check this process's committed shards: take back those whose files are damaged, refuse,
    naming them, clips whose file holds audio that audio.jsonl does not record; take back the shards of clips to
    re-encode (their rows are then computed again, and changes.jsonl says which); record the new stat of files
    only rewritten. Returns the ids of the clips to re-encode."""
    verdicts, stats = audio_changes(config, writer, records)
    if verdicts["refuse"]:
        clips = [record["id"] for _, record in verdicts["refuse"]]
        raise ValueError(f"{', '.join(clips[:5])}{' …' if len(clips) > 5 else ''}: {len(clips)} clip(s) of "
                         f"{config.dataset} changed since 00_prepare recorded them (their files no longer match the "
                         f"sha256 in audio.jsonl); run 00_prepare again with the same options (`"
                         f"{prepare_command(config.dataset)}`), which re-checks the audio and records the change, "
                         "then this command again to re-encode them")
    for shard in sorted({shard for shard, _ in stats}):
        writer.refresh_stats(shard, {row: now for (done, row), now in stats.items() if done == shard})
    changed = verdicts["re-encode"]
    if changed:
        clips = [record["id"] for _, record in changed]
        console.print(f"re-encoding {len(clips)} clip(s) whose audio changed ({', '.join(clips[:5])}"
                      f"{' …' if len(clips) > 5 else ''}): their {len({s for s, _ in changed})} shard(s) are "
                      "computed again; changes.jsonl records it", highlight=False)
        writer.uncommit(sorted({shard for shard, _ in changed}), "audio changed", clips)
    if verdicts["gone"]:
        console.print(f"[yellow]note:[/] {len(verdicts['gone'])} clip(s)' audio files are not here (e.g. "
                      f"{verdicts['gone'][0][1]['id']}); their embeddings stay as they were encoded", highlight=False)
    return frozenset(record["id"] for _, record in changed)


def audio_changes(config: PrecomputeConfig, writer: StoreWriter, records: list[dict]) -> tuple[dict, dict]:
    """({verdict: [(shard, stored record)]} for refuse, re-encode and gone; {(shard, row): new stat} of files
    rewritten with the same audio) over this process's committed shards (integrity.audio_verdict), whose files are
    checked on the way (a damaged shard is taken back). A stat per clip, in one pass; a hash, in threads, only
    where a file's size or modification time changed (or for every file, with --check-audio)."""
    mine = config.mine(writer)
    verdicts: dict[str, list[tuple[int, dict]]] = {"refuse": [], "re-encode": [], "gone": []}
    to_hash = []  # (shard, stored record, file, its stat now)
    with progress_bar(transient=True) as progress:
        task = progress.add_task("checking the store and the audio", total=sum(map(writer.is_done, mine)))
        for shard, marker in writer.committed_markers(mine):  # damaged shards are taken back, to compute again
            for record in marker["records"]:
                verdict, path, now = audio_verdict(record, records[record["row"]], config.dataset,
                                                   config.check_audio)
                if verdict == "hash":
                    to_hash.append((shard, record, path, now))
                elif verdict != "same":
                    verdicts[verdict].append((shard, record))
            progress.advance(task)
    stats = {}
    with ThreadPoolExecutor(config.decode_workers or 4) as pool:  # hashing releases the GIL
        hashed = pool.map(lambda item: hashed_verdict(item[1], records[item[1]["row"]], item[2], item[3]), to_hash)
        for (shard, record, _, now), verdict in zip(to_hash, hashed):
            if verdict == "touched":
                stats[shard, record["row"]] = now
            elif verdict != "same":
                verdicts[verdict].append((shard, record))
    return verdicts, stats


@contextmanager
def encoder_threads(encoder: AudioEncoder) -> Iterator[None]:
    """Give a CPU encoder its thread count for the run (it shares the cores with ffmpeg), then restore it."""
    if encoder.config.resolved_device != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(encoder.cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def decode_checked(record: dict, source: Source, stat: dict, config: PrecomputeConfig, sample_rate: int,
                   hash_it: bool) -> list[tuple[np.ndarray, float]]:
    """decode_views of a clip whose file is first checked against audio.jsonl's sha256 (`stat`: its stat now,
    from stat_fields; `hash_it`: hash the file whatever its stat): a file that changed after 00_prepare hashed it
    is never stored as encoded."""
    path = None if isinstance(source, (bytes, Exception)) else local_audio_path(record, config.dataset)
    now = recorded_stat(stat) if stat else None
    if path is not None and not matches_manifest(record, path, now, config.check_audio or hash_it):
        raise AudioDecodeError(f"{record['path']}: its file does not match the sha256 that audio.jsonl records (it "
                               "changed after 00_prepare hashed it); run 00_prepare again with the same options to "
                               "re-check the dataset's audio")
    return decode_views(record, source, config.encoder, config.min_seconds, sample_rate)


def _decoded_ahead(pool: ThreadPoolExecutor, sources: Iterator[tuple[int, dict, Source]], config: PrecomputeConfig,
                   encoder: AudioEncoder, stats: list[dict], reencoded: frozenset[str]) -> Iterator[tuple[int, Future]]:
    """Yield (position, future of decode_checked) in source order, keeping a bounded number of decodes ahead."""
    ahead: deque[tuple[int, Future]] = deque()
    limit = 4 * config.encoder.batch_size
    for position, record, source in sources:
        ahead.append((position, pool.submit(decode_checked, record, source, stats[position], config,
                                               encoder.sample_rate, record["id"] in reencoded)))
        if len(ahead) >= limit:
            yield ahead.popleft()
    yield from ahead


def encode_shard(config: PrecomputeConfig, encoder: AudioEncoder, pool: ThreadPoolExecutor, records: list[dict],
                 rows: range, advance: Callable[[int], None],
                 reencoded: frozenset[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode and encode the clips of one shard: embeddings (n, V, T, D), valid tokens (n, V), index records.
    Clips in `reencoded` (their audio changed) have their files hashed whatever their stat.

    A failed clip gets zero rows, valid 0 and its reason in the index; views a short clip lacks get valid 0."""
    views, tokens, dim = config.encoder.views, config.encoder.tokens, encoder.dim
    embeddings = np.zeros((len(records), views, tokens, dim), dtype=np.float16)
    valid = np.zeros((len(records), views), dtype=np.int16)
    stats = [stat_fields(record, config.dataset) for record in records]  # before decoding: what is encoded
    index = [{"id": r["id"], "row": row, "path": r["path"], "duration": r.get("duration"),
              "sha256": r.get("sha256"), **stat, "status": "ok"} for r, row, stat in zip(records, rows, stats)]
    batch: list[tuple[int, int, np.ndarray, float]] = []  # (position, view, waveform, valid fraction)

    def flush() -> None:
        positions, view_numbers = [item[0] for item in batch], [item[1] for item in batch]
        encoded, counts = encoder.encode(np.stack([item[2] for item in batch]), np.array([item[3] for item in batch]))
        embeddings[positions, view_numbers], valid[positions, view_numbers] = encoded, counts
        for position, finite in zip(positions, np.isfinite(encoded).all(axis=(1, 2))):
            if not finite:
                index[position]["status"] = "failed: encoder output is not finite (NaN/inf)"
        for position in set(positions):
            if index[position]["status"] != "ok":  # a failed clip keeps no view, whichever batch held them
                embeddings[position], valid[position] = 0, 0
        batch.clear()

    for position, future in _decoded_ahead(pool, sources_of(records, config.dataset), config, encoder, stats,
                                           reencoded):
        try:
            decoded = future.result()
        except (AudioDecodeError, OSError, ValueError) as error:
            index[position]["status"] = f"failed: {error}"
            advance(1)
            continue
        batch.extend((position, view, wave, fraction) for view, (wave, fraction) in enumerate(decoded))
        if len(batch) >= config.encoder.batch_size:
            flush()
        advance(1)
    if batch:
        flush()
    return embeddings, valid, index

