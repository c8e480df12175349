"""ffmpeg decoding of every format the synthetic set writes, the crop/pad policy, and missing-ffmpeg errors."""

from __future__ import annotations

import numpy as np
import pytest

from mellow import audio
from mellow.audio import AudioDecodeError, FfmpegNotFoundError, decode_audio, encode_audio_file, fit_length


def _tone(frequency: float, seconds: float, sample_rate: int) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3", ".ogg"])
@pytest.mark.parametrize("sample_rate,channels", [(44100, 2), (22050, 1)])
def test_decode_each_format_to_mono_at_target_rate(tmp_path, suffix, sample_rate, channels):
    path = tmp_path / f"tone{suffix}"
    encode_audio_file(_tone(440.0, 1.5, sample_rate), sample_rate, path, channels)
    waveform = decode_audio(path, 16000)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) - 1.5 * 16000) < 0.1 * 16000  # lossy codecs add a little padding
    spectrum = np.abs(np.fft.rfft(waveform))
    peak_hz = np.argmax(spectrum) * 16000 / len(waveform)
    assert abs(peak_hz - 440.0) < 5.0
    assert 0.15 < np.abs(waveform).max() < 0.45


def test_decode_seeks_with_offset_and_duration(tmp_path):
    path = tmp_path / "long.wav"
    encode_audio_file(_tone(300.0, 3.0, 16000), 16000, path)
    assert len(decode_audio(path, 16000, offset_seconds=1.0, duration_seconds=0.5)) == 8000


def test_corrupt_empty_and_missing_files_raise_a_decode_error(tmp_path):
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"this is not audio" * 100)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for path in (corrupt, empty, tmp_path / "missing.flac"):
        with pytest.raises(AudioDecodeError, match=path.name):
            decode_audio(path, 16000)


def test_fit_length_policies():
    wave = np.arange(1, 5, dtype=np.float32)
    padded, fraction = fit_length(wave, 8, "pad")
    assert padded.tolist() == [1, 2, 3, 4, 0, 0, 0, 0] and fraction == 0.5
    repeated, fraction = fit_length(wave, 6, "repeat")
    assert repeated.tolist() == [1, 2, 3, 4, 1, 2] and fraction == 1.0
    centered, _ = fit_length(wave, 8, "center")
    assert centered.tolist() == [0, 0, 1, 2, 3, 4, 0, 0]
    cropped, fraction = fit_length(np.arange(10, dtype=np.float32), 4, "center")
    assert cropped.tolist() == [3, 4, 5, 6] and fraction == 1.0


def test_missing_ffmpeg_is_a_clear_error(monkeypatch):
    audio.find_ffmpeg.cache_clear()
    monkeypatch.setenv("MELLOW_FFMPEG", "/nonexistent/ffmpeg")
    with pytest.raises(FfmpegNotFoundError, match="MELLOW_FFMPEG"):
        audio.find_ffmpeg()
    monkeypatch.delenv("MELLOW_FFMPEG")
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    import imageio_ffmpeg

    def no_binary():
        raise RuntimeError("no ffmpeg exe could be found")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    audio.find_ffmpeg.cache_clear()
    with pytest.raises(FfmpegNotFoundError, match="apt-get install ffmpeg"):
        audio.find_ffmpeg()
    audio.find_ffmpeg.cache_clear()
