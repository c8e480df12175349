"""Precompute throughput, measured in one run on the same clips (machines here are noisy: compare ratios).

    uv run python benchmarks/precompute.py --encoder whisper-tiny --clips 200

Prints clips/s of: the pipeline (mellow's stage 01, writing the store); a naive per-file loop (decode one
file, encode it alone); decoding alone (the same thread pool as the pipeline); the encoder alone on
pre-decoded arrays (the pipeline's batch size). On a CPU, where decoding and encoding share the cores, the
best a pipeline can do is 1 / (decode time + encode time per clip), each measured alone with all cores; on a
GPU it is the slower of the two. Also prints bytes per clip on disk and the ratio to raw float16.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mellow.audio import views
from mellow.audio.decode import decode_audio, fit_length
from mellow.encode import precompute
from mellow.encode.encoders import build_encoder
from mellow.files import read_jsonl
from mellow.settings import EncoderConfig, PrecomputeConfig
from mellow.sources import prepare
from mellow.sources.config import PrepareConfig
from mellow.store.writer import StoreConfig


def decode_all(records: list[dict], config: PrecomputeConfig, sample_rate: int,
               workers: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The pipeline's own decode step (ffmpeg, checks, crop) for every clip, in the same kind of pool."""
    def one(record: dict) -> tuple[np.ndarray, float]:
        return views.decode_views(record, str(config.dataset / record["path"]), config.encoder,
                                        config.min_seconds, sample_rate)[0]

    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(one, records))
    return [wave for wave, _ in decoded], np.array([fraction for _, fraction in decoded])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="whisper-tiny", help="whisper-tiny, mel or hf:<dir>")
    parser.add_argument("--clips", type=int, default=400, help="synthetic clips to generate and encode")
    parser.add_argument("--clip-seconds", type=float, default=6.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mellow-bench-"))
    dataset = prepare.run(PrepareConfig(root=work / "datasets", num_clips=args.clips))
    records = read_jsonl(dataset / "audio.jsonl")
    encoder_config = EncoderConfig(name=args.encoder, clip_seconds=args.clip_seconds, tokens=args.tokens,
                                   batch_size=args.batch_size)
    encoder = build_encoder(encoder_config)
    config = PrecomputeConfig(dataset=dataset, encoder=encoder_config, store=StoreConfig(root=work / "shards"))
    workers = 2 * (os.cpu_count() or 1)
    decode_all(records[:8], config, encoder.sample_rate, workers)  # warm caches

    started = time.perf_counter()
    result = precompute.run(config)
    pipeline = len(records) / (time.perf_counter() - started)

    started = time.perf_counter()
    for record in records:
        waveform = decode_audio(dataset / record["path"], encoder.sample_rate)
        fitted, fraction = fit_length(waveform, int(round(args.clip_seconds * encoder.sample_rate)), "pad")
        encoder.encode(fitted[None], np.array([fraction]))
    naive = len(records) / (time.perf_counter() - started)

    started = time.perf_counter()
    waves, fractions = decode_all(records, config, encoder.sample_rate, workers)
    decode_seconds = (time.perf_counter() - started) / len(records)

    started = time.perf_counter()
    for start in range(0, len(waves), args.batch_size):
        encoder.encode(np.stack(waves[start : start + args.batch_size]), fractions[start : start + args.batch_size])
    encode_seconds = (time.perf_counter() - started) / len(records)

    on_gpu = encoder_config.resolved_device.startswith("cuda")
    limit = 1 / max(decode_seconds, encode_seconds) if on_gpu else 1 / (decode_seconds + encode_seconds)
    size = sum(f.stat().st_size for f in (result.store_path / "store.zarr").rglob("*") if f.is_file())
    raw = len(records) * args.tokens * encoder.dim * 2
    print(f"\nencoder {args.encoder}, {len(records)} clips of {args.clip_seconds:g} s, {args.tokens} tokens x "
          f"{encoder.dim}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"{'GPU' if on_gpu else 'CPU'}")
    print(f"decode alone      {1 / decode_seconds:8.1f} clips/s ({workers} ffmpeg workers)")
    print(f"encode alone      {1 / encode_seconds:8.1f} clips/s (batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads; the pipeline gives this encoder {encoder.cpu_threads()} on a CPU)")
    print(f"limit             {limit:8.1f} clips/s ({'slower of the two' if on_gpu else '1 / (decode + encode)'})")
    print(f"naive loop        {naive:8.1f} clips/s")
    print(f"pipeline          {pipeline:8.1f} clips/s = {pipeline / limit:.2f} x limit, {pipeline / naive:.2f} x naive")
    print(f"store             {size / len(records):8.0f} bytes/clip on disk = {size / raw:.2f} x raw float16")


if __name__ == "__main__":
    main()
