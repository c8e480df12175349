"""Audio decoding through ffmpeg, and the crop/pad policy that gives every clip the same length."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

import ffmpeg
import numpy as np

CropPolicy = Literal["pad", "repeat", "center"]


class FfmpegNotFoundError(RuntimeError):
    """No ffmpeg binary could be found."""


class AudioDecodeError(RuntimeError):
    """ffmpeg could not decode a file (missing, corrupt, not audio, or empty)."""


class NoSamplesError(AudioDecodeError):
    """ffmpeg decoded nothing: an empty file, or a seek past the end of the audio."""


@lru_cache(maxsize=1)
def find_ffmpeg() -> str:
    """The ffmpeg binary: $MELLOW_FFMPEG, else `ffmpeg` on PATH, else the one shipped in imageio-ffmpeg."""
    override = os.environ.get("MELLOW_FFMPEG")
    if override:
        if Path(override).is_file() or shutil.which(override):
            return override
        raise FfmpegNotFoundError(
            f"MELLOW_FFMPEG={override!r} is not an executable file; point it at an ffmpeg binary or unset it"
        )
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as error:
        raise FfmpegNotFoundError(
            "ffmpeg not found: install it (`apt-get install ffmpeg`), put it on PATH, set MELLOW_FFMPEG, "
            f"or install the `imageio-ffmpeg` package ({error})"
        ) from error


def decode_audio(
    source: str | Path | bytes,
    sample_rate: int,
    offset_seconds: float | None = None,
    duration_seconds: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode any format ffmpeg reads into mono float32 at `sample_rate`, shape (samples,).

    `source` is a path, a URL, or the bytes of an audio file (e.g. a member of a WebDataset tar); `name`
    names it in errors (default: the path). `offset_seconds`/`duration_seconds` go before `-i`, so ffmpeg
    seeks instead of decoding what it skips.
    """
    if isinstance(source, bytes):
        # A temporary file, not a pipe: ffmpeg trims an MP3's encoder padding and seeks only in seekable input,
        # so this decodes exactly as the original file would.
        with tempfile.NamedTemporaryFile(suffix=Path(name or "").suffix) as handle:
            handle.write(source)
            handle.flush()
            return decode_audio(handle.name, sample_rate, offset_seconds, duration_seconds, name or "<bytes>")
    name = name or str(source)
    input_options: dict[str, float] = {}
    if "://" in str(source):
        input_options["rw_timeout"] = 30_000_000  # microseconds: a dead server fails the clip, not the job
    if offset_seconds:
        input_options["ss"] = offset_seconds
    if duration_seconds:
        input_options["t"] = duration_seconds
    arguments = (
        ffmpeg.input(str(source), **input_options)
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate)
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
        .compile(cmd=find_ffmpeg())
    )
    # stderr goes to a temporary file so that stdout is read in one blocking call: communicate() would poll two
    # pipes from Python for each of the ~50 small writes ffmpeg makes per clip (measured: ~1 ms of CPU per clip,
    # which the encoder needs on a CPU machine).
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        samples = process.stdout.read()
        process.stdout.close()
        if process.wait() != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip().splitlines()
            raise AudioDecodeError(f"{name}: {message[-1] if message else 'ffmpeg failed'}")
    waveform = np.frombuffer(samples, dtype=np.float32)
    if waveform.size == 0:
        raise NoSamplesError(f"{name}: decoded to zero samples (empty or not audio)")
    if not np.isfinite(waveform).all():
        raise AudioDecodeError(f"{name}: decoded samples contain NaN or infinity")
    return waveform


def encode_audio_file(waveform: np.ndarray, sample_rate: int, path: Path, channels: int = 1) -> None:
    """Write a mono float waveform to `path` in the format its suffix names (wav, flac, mp3, ogg, ...)."""
    data = np.ascontiguousarray(np.repeat(waveform[:, None], channels, axis=1), dtype=np.float32)
    codec = {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libvorbis"}.get(path.suffix)
    output_options = {"acodec": codec} if codec else {}
    process = (
        ffmpeg.input("pipe:", format="f32le", ac=channels, ar=sample_rate)
        .output(str(path), **output_options)
        .overwrite_output()
        .run_async(cmd=find_ffmpeg(), pipe_stdin=True, quiet=True)
    )
    _, stderr = process.communicate(input=data.tobytes())
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, "ffmpeg", stderr=stderr)


def fit_length(waveform: np.ndarray, num_samples: int, policy: CropPolicy) -> tuple[np.ndarray, float]:
    """Crop or pad `waveform` to `num_samples`; return it with the fraction of it that is real audio.

    pad: keep the start, zero-pad the end. center: crop around the middle, zero-pad both ends.
    repeat: tile short clips (all of the result counts as real audio), crop long ones at the start.
    """
    length = waveform.shape[0]
    if length >= num_samples:
        start = (length - num_samples) // 2 if policy == "center" else 0
        return waveform[start : start + num_samples], 1.0
    if policy == "repeat":
        repeats = -(-num_samples // length)
        return np.tile(waveform, repeats)[:num_samples], 1.0
    before = (num_samples - length) // 2 if policy == "center" else 0
    padded = np.zeros(num_samples, dtype=waveform.dtype)
    padded[before : before + length] = waveform
    return padded, length / num_samples
