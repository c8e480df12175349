"""The crop/view policy: which seconds of a clip the store keeps (one crop padded, repeated or centred, or
several views spread over a long clip), decoded through FFmpeg. 01_precompute and `mellow ask` use
this one policy, so a clip is seen the same way in training and in use."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from mellow.audio.decode import AudioDecodeError, CropPolicy, NoSamplesError, decode_audio, fit_length
from mellow.audio.sources import Source


class ViewSettings(Protocol):
    """What the policy reads of an encoder's settings (EncoderConfig has these)."""

    clip_seconds: float
    views: int
    crop: CropPolicy


def view_offsets(duration: float, clip_seconds: float, views: int, crop: CropPolicy) -> list[float]:
    """Start times of the crops kept of a clip of `duration` seconds.

    One view: the start (pad, repeat) or the middle (center). K views of a clip longer than clip_seconds:
    min(K, ceil(duration / clip_seconds)) crops spread evenly from the start to the end. Shorter clips: one.
    """
    if duration <= clip_seconds:
        return [0.0]
    if views == 1:
        return [(duration - clip_seconds) / 2 if crop == "center" else 0.0]
    count = min(views, math.ceil(duration / clip_seconds))
    return [index * (duration - clip_seconds) / (count - 1) for index in range(count)]


def decode_views(record: dict, source: Source, encoder: ViewSettings, min_seconds: float,
                 sample_rate: int) -> list[tuple[np.ndarray, float]]:
    """Decode the crops of a clip that the store keeps, fitted to clip_seconds: [(waveform, valid fraction)].

    With the duration known, ffmpeg seeks to each crop and decodes only it; without it, a center crop or
    several views need the whole file, decoded once and cut here. Raises AudioDecodeError for anything
    unusable: unreadable, empty, digital silence, shorter than --min-seconds, or truncated (much shorter than
    the duration its manifest records). A record with `start` is a piece of a longer file: its crops are taken
    from `start` to `start + duration`.
    """
    if isinstance(source, Exception):
        raise source
    clip_seconds, crop, views = encoder.clip_seconds, encoder.crop, encoder.views
    duration, name = record.get("duration"), record["path"]
    piece, start = "start" in record, record.get("start") or 0.0  # a piece of a longer file, from `start` seconds
    if duration is None and (crop == "center" or views > 1):
        whole = decode_audio(source, sample_rate, offset_seconds=start, name=name)
        offsets = view_offsets(whole.shape[0] / sample_rate, clip_seconds, views, crop)
        clip = int(round(clip_seconds * sample_rate))
        waves = [whole[int(round(offset * sample_rate)):][:clip] for offset in offsets]
    else:
        offsets = view_offsets(duration or clip_seconds, clip_seconds, views, crop)
        # a piece ends where its duration says, not where the file does
        lengths = [min(clip_seconds, duration - offset) if piece and duration else clip_seconds for offset in offsets]
        waves = [_decode_view(source, sample_rate, start + offset, length, name, duration and start + duration)
                 for offset, length in zip(offsets, lengths)]
    if all(float(np.abs(wave).max()) == 0.0 for wave in waves):
        raise AudioDecodeError(f"{name}: all samples are zero (digital silence)")
    seconds = waves[0].shape[0] / sample_rate
    if seconds < min_seconds:
        raise AudioDecodeError(f"{name}: {seconds:.3f} s of audio, shorter than --min-seconds {min_seconds}")
    for offset, wave in zip(offsets, waves):
        # a piece's duration is nominal (an AudioCaps clip near the end of its video is shorter than 10 s)
        expected = min(duration - offset, clip_seconds) if duration and not piece else 0.0
        if wave.shape[0] / sample_rate < 0.9 * expected - 0.05:
            raise AudioDecodeError(f"{name}: truncated: decoded {wave.shape[0] / sample_rate:.2f} s at "
                                   f"{offset:.2f} s where the manifest says {expected:.2f} s")
    return [fit_length(wave, int(round(clip_seconds * sample_rate)), crop) for wave in waves]


def _decode_view(source: Source, sample_rate: int, offset: float, clip_seconds: float, name: str,
                 duration: float | None) -> np.ndarray:
    """One crop, decoded by seeking; nothing at all past the start of a file the manifest says is longer is a
    truncated file, not an empty one."""
    try:
        return decode_audio(source, sample_rate, offset_seconds=offset, duration_seconds=clip_seconds, name=name)
    except NoSamplesError:
        if duration and offset > 0:
            raise AudioDecodeError(f"{name}: truncated: no audio at {offset:.2f} s where the manifest says it "
                                   f"lasts {duration:.2f} s") from None
        raise

