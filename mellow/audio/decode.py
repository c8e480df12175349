"""Audio decoding through ffmpeg, and the crop/pad policy that gives every clip the same length."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
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
    backend: DecodeBackend = "auto",
) -> np.ndarray:
    """Decode any format ffmpeg reads into mono float32 at `sample_rate`, shape (samples,).

    `source` is a path, a URL, or the bytes of an audio file (e.g. a member of a WebDataset tar); `name`
    names it in errors (default: the path). `offset_seconds`/`duration_seconds` seek instead of decoding what
    is skipped. `backend`: `pyav` decodes with FFmpeg's libraries in this process (no process per clip),
    `cli` runs the ffmpeg program (and reads every URL); `auto` is $MELLOW_DECODER if set, else pyav where PyAV
    is installed. Both give the same samples (tests/test_audio.py), except after a seek into an MP3 or AAC file,
    where the CLI starts from a decoder without preroll (MP3) or a few hundred samples off (AAC) and PyAV, which
    decodes from the start (or 10 s before a far offset) and cuts, matches the whole file's samples.
    """
    if source == b"" or (not isinstance(source, bytes) and "://" not in str(source)[:16] and _is_empty_file(source)):
        raise NoSamplesError(f"{name or ('<bytes>' if isinstance(source, bytes) else source)}: empty file (0 bytes)")
    if resolve_backend(backend) == "pyav" and "://" not in str(source)[:16]:  # URLs: the CLI's network stack
        return checked(decode_in_process(source, sample_rate, offset_seconds, duration_seconds, name),
                       name or ("<bytes>" if isinstance(source, bytes) else str(source)))
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
            last = message[-1].removeprefix(f"{source}: ") if message else "ffmpeg failed"
            raise AudioDecodeError(f"{name}: {as_sentence(last)}")
    return checked(np.frombuffer(samples, dtype=np.float32), name)


def _is_empty_file(path: str | Path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:  # missing or unreadable: the decoder says which
        return False


# FFmpeg's error texts, as a reader of a skipped clip's reason wants them
SENTENCES = {"invalid data found when processing input": "not audio that ffmpeg can read (its data is invalid)",
             "no such file or directory": "no such file",
             "end of file": "not audio that ffmpeg can read (it ends before its first audio frame)"}


def as_sentence(ffmpeg_error: str) -> str:
    """An FFmpeg error text ("Error opening input files: Invalid data found when processing input") as a
    sentence about the file."""
    text = ffmpeg_error.strip().rstrip(".")
    return next((sentence for known, sentence in SENTENCES.items() if known in text.lower()), text)


def checked(waveform: np.ndarray, name: str) -> np.ndarray:
    if waveform.size == 0:
        raise NoSamplesError(f"{name}: decoded to zero samples (empty or not audio)")
    if not np.isfinite(waveform).all():
        raise AudioDecodeError(f"{name}: decoded samples contain NaN or infinity")
    return waveform


DecodeBackend = Literal["auto", "pyav", "cli"]


def resolve_backend(backend: DecodeBackend) -> str:
    """`pyav` or `cli` for a backend setting (auto: $MELLOW_DECODER, else pyav when it is installed)."""
    if backend == "auto":
        backend = os.environ.get("MELLOW_DECODER", "auto")
    if backend not in ("auto", "pyav", "cli"):
        raise ValueError(f"MELLOW_DECODER={backend!r} must be pyav, cli or auto")
    if backend == "auto":
        backend = "pyav" if _pyav_installed() else "cli"
    return backend


@lru_cache(maxsize=1)
def _pyav_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def decoder_description(backend: DecodeBackend = "auto") -> str:
    """Which decoder decode_audio uses, with its FFmpeg version (recorded in a store's meta.json)."""
    if resolve_backend(backend) == "pyav":
        import av

        return f"pyav {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})"
    return f"ffmpeg cli {find_ffmpeg()}"


def declared_seconds(data: bytes, name: str) -> float | None:
    """How long the audio in a file's bytes says it lasts (its container's or audio stream's duration), read
    without decoding; None when it does not say. An AudioDecodeError when the bytes are no audio file PyAV opens."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = next((stream for stream in container.streams if stream.type == "audio"), None)
            if stream is None:
                raise AudioDecodeError(f"{name}: no audio stream")
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration is not None else None
    except av.error.FFmpegError as error:
        raise AudioDecodeError(f"{name}: {as_sentence(error.strerror or type(error).__name__)}") from None


def decode_in_process(source: str | Path | bytes, sample_rate: int, offset_seconds: float | None,
                      duration_seconds: float | None, name: str | None) -> np.ndarray:
    """decode_audio through PyAV: the same FFmpeg decoders and swresample as the CLI, without a process per clip.
    The input is cut to [offset, offset + duration) at its own sample rate before resampling, as the CLI's
    input options cut it; far offsets seek first (to 10 s before: a seek lands on a packet boundary)."""
    import io

    import av

    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    start = offset_seconds or 0.0
    stop = start + duration_seconds if duration_seconds else math.inf
    try:
        with av.open(opened) as container:
            stream = next((stream for stream in container.streams if stream.type == "audio"), None)
            if stream is None:
                raise AudioDecodeError(f"{name}: no audio stream")
            if stream.duration is not None and "mp4" in container.format.name:
                # MP4/M4A (AAC) end in encoder padding that the edit list's duration excludes; the CLI cuts it
                stop = min(stop, float(stream.duration * stream.time_base))
            # times count from the stream's first sample, as the CLI's do (an MP3's start is its encoder delay)
            origin = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            if start > 30:
                container.seek(int((origin + start - 10) * av.time_base), backward=True)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            pieces = []
            for frame in _frames(container, stream):
                if frame.time is not None:
                    time = frame.time - origin
                    if time >= stop:
                        break
                    last = round((stop - time) * frame.sample_rate) if stop < math.inf else frame.samples
                    frame = _cut(frame, round((start - time) * frame.sample_rate), last)
                    if frame is None:
                        continue
                pieces.extend(out.to_ndarray()[0] for out in resampler.resample(frame))
            pieces.extend(out.to_ndarray()[0] for out in resampler.resample(None))
    except av.error.FFmpegError as error:  # its str is "[Errno 1094995529] Invalid data ...: '<path>'"
        raise AudioDecodeError(f"{name}: {as_sentence(error.strerror or type(error).__name__)}") from None
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def _frames(container, stream) -> Iterator:
    """The decoded frames of `stream`, skipping packets the decoder rejects (a damaged or cut-off frame), as the
    ffmpeg CLI does: a truncated file gives the audio it still holds."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _cut(frame, first: int, last: int):
    """`frame` with only its samples [first, last) (None when none are left), before resampling."""
    import av

    first, last = max(first, 0), min(last, frame.samples)
    if first == 0 and last == frame.samples:
        return frame
    if last <= first:
        return None
    samples = frame.to_ndarray()  # (channels, samples) planar, or (1, samples * channels) packed
    channels = 1 if frame.format.is_planar else len(frame.layout.channels)
    cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, first * channels : last * channels]),
                                     format=frame.format.name, layout=frame.layout.name)
    cut.sample_rate, cut.time_base = frame.sample_rate, frame.time_base
    cut.pts = frame.pts + round(first / frame.sample_rate / frame.time_base) if frame.pts is not None else None
    return cut


def encode_audio_file(waveform: np.ndarray, sample_rate: int, path: Path, channels: int = 1,
                      bitrate: str | None = None) -> None:
    """Write a mono float waveform to `path` in the format its suffix names (wav, flac, mp3, ogg, ...), at
    `bitrate` (e.g. "48k") for a lossy one if given."""
    data = np.ascontiguousarray(np.repeat(waveform[:, None], channels, axis=1), dtype=np.float32)
    codec = {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libvorbis"}.get(path.suffix)
    output_options = ({"acodec": codec} if codec else {}) | ({"audio_bitrate": bitrate} if bitrate else {})
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

