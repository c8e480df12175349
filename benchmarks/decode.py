"""Audio decoding for GPU-rate precompute: the ffmpeg CLI per clip vs. FFmpeg in-process (PyAV), in one run.

    uv run python benchmarks/decode.py [--clips 40] [--seconds 10] [--rate 16000]

On a GPU the encoder is no longer the bottleneck; decoding is. For 10 s clips in wav, flac, mp3, ogg and m4a
(AAC) at 44.1 and 48 kHz, stereo, made with ffmpeg, this decodes every clip to mono float32 at --rate on one
core, one clip at a time, through mellow's own `decode_audio` with each backend, and prints clips/s per core,
the ratio, and how far the two backends' samples are apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mellow.audio.decode import decode_audio, encode_audio_file  # noqa: E402

FORMATS = ("wav", "flac", "mp3", "ogg", "m4a")


def make_clips(folder: Path, count: int, seconds: float, rate: int, suffix: str) -> list[Path]:
    generator = np.random.default_rng(rate)
    paths = []
    for number in range(count):
        time_axis = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * generator.uniform(100, 2000) * time_axis)
        waveform = (tone + 0.05 * generator.standard_normal(len(time_axis))).astype(np.float32)
        path = folder / f"clip{number:03d}-{rate}.{suffix}"
        encode_audio_file(waveform, rate, path, channels=2)
        paths.append(path)
    return paths


def clips_per_second(paths: list[Path], rate: int, backend: str) -> tuple[float, list[np.ndarray]]:
    decode_audio(paths[0], rate, backend=backend)  # warm: page cache, libraries loaded
    started = time.perf_counter()
    waveforms = [decode_audio(path, rate, backend=backend) for path in paths]
    return len(paths) / (time.perf_counter() - started), waveforms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40, help="Clips per format and source rate.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each clip.")
    parser.add_argument("--rate", type=int, default=16000, help="Sample rate decoded to (whisper: 16000).")
    args = parser.parse_args()
    print(f"{'format':>6} {'source':>7} | {'ffmpeg CLI':>10} {'PyAV':>8} clips/s | {'ratio':>5} | "
          f"max |diff|  length diff")
    totals = {"cli": 0.0, "pyav": 0.0}  # seconds per clip, summed over every format and rate
    with tempfile.TemporaryDirectory() as folder:
        for suffix in FORMATS:
            for source_rate in (44100, 48000):
                paths = make_clips(Path(folder), args.clips, args.seconds, source_rate, suffix)
                cli, cli_waves = clips_per_second(paths, args.rate, "cli")
                pyav, pyav_waves = clips_per_second(paths, args.rate, "pyav")
                totals["cli"], totals["pyav"] = totals["cli"] + 1 / cli, totals["pyav"] + 1 / pyav
                lengths = max(abs(len(a) - len(b)) for a, b in zip(cli_waves, pyav_waves))
                difference = max(float(np.abs(a[: len(b)] - b[: len(a)]).max()) for a, b in zip(cli_waves, pyav_waves))
                print(f"{suffix:>6} {source_rate:>7} | {cli:10.1f} {pyav:8.1f}         | {pyav / cli:5.2f} | "
                      f"{difference:.2e}  {lengths}", flush=True)

    count = 2 * len(FORMATS)
    print(f"{'all':>6} {'':>7} | {count / totals['cli']:10.1f} {count / totals['pyav']:8.1f}         | "
          f"{totals['cli'] / totals['pyav']:5.2f} | (one clip of each kind, in turn)")


if __name__ == "__main__":
    main()
