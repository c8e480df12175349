"""ffmpeg decoding of every format the synthetic set writes, the crop/pad policy, and missing-ffmpeg errors."""

from __future__ import annotations

import numpy as np
import pytest

from mellow.audio import decode
from mellow.audio.decode import AudioDecodeError, FfmpegNotFoundError, decode_audio, encode_audio_file, fit_length


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


@pytest.mark.parametrize("backend", ["pyav", "cli"])
def test_corrupt_empty_and_missing_files_raise_a_decode_error(tmp_path, backend):
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"this is not audio" * 100)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("no audio stream in here\n" * 50)
    for path in (corrupt, empty, tmp_path / "missing.flac", text):
        with pytest.raises(AudioDecodeError, match=path.name):
            decode_audio(path, 16000, backend=backend)
    truncated = tmp_path / "truncated.flac"
    encode_audio_file(_tone(500.0, 2.0, 44100), 44100, truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a copy cut short: the header and half the frames survive
    assert 8000 < len(decode_audio(truncated, 16000, backend=backend)) < 24000  # what is there, not an error


@pytest.fixture(scope="module")
def noisy_clips(tmp_path_factory) -> list:
    """6 s stereo tone + noise at 44.1 and 48 kHz in every format the pipeline meets (m4a: AAC in MP4)."""
    folder, generator, paths = tmp_path_factory.mktemp("formats"), np.random.default_rng(0), []
    for suffix in ("wav", "flac", "mp3", "ogg", "m4a"):
        for rate in (44100, 48000):
            wave = _tone(generator.uniform(100, 900), 6.0, rate) + 0.02 * generator.standard_normal(6 * rate)
            encode_audio_file(wave.astype(np.float32), rate, folder / f"clip-{rate}.{suffix}", channels=2)
            paths.append(folder / f"clip-{rate}.{suffix}")
    return paths


def test_in_process_decoding_gives_the_clis_samples(noisy_clips):
    for path in noisy_clips:
        cli = decode_audio(path, 16000, backend="cli")
        assert len(cli) == 96000, path.name
        np.testing.assert_array_equal(decode_audio(path, 16000, backend="pyav"), cli, err_msg=path.name)
        np.testing.assert_array_equal(decode_audio(path.read_bytes(), 16000, name=path.name, backend="pyav"), cli)
        # what 01_precompute asks for a clip: its first clip_seconds
        np.testing.assert_array_equal(decode_audio(path, 16000, duration_seconds=3.0, backend="pyav"),
                                      decode_audio(path, 16000, duration_seconds=3.0, backend="cli"))


@pytest.mark.parametrize("offset,duration", [(2.3, 2.0), (1.0, None)])
def test_in_process_seeks_land_on_the_whole_files_samples(noisy_clips, offset, duration):
    """After a seek the CLI gives the same samples for wav, flac and ogg; for MP3 (no decoder preroll) and AAC (a
    few hundred samples off) it does not, and in-process decoding matches the whole file's samples instead."""
    for path in noisy_clips:
        whole = decode_audio(path, 16000, backend="pyav")
        expected = whole[round(offset * 16000) :][: round(duration * 16000) if duration else None]
        got = decode_audio(path, 16000, offset, duration, backend="pyav")
        assert len(got) == len(expected), path.name
        # identical but for the resampler's filter length at each cut (it starts afresh there, as the CLI's does)
        np.testing.assert_array_equal(got[64:-64], expected[64:-64], err_msg=path.name)
        np.testing.assert_allclose(got, expected, atol=0.05, err_msg=path.name)
        if path.suffix in (".wav", ".flac", ".ogg"):
            np.testing.assert_array_equal(got, decode_audio(path, 16000, offset, duration, backend="cli"))


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
    decode.find_ffmpeg.cache_clear()
    monkeypatch.setenv("MELLOW_FFMPEG", "/nonexistent/ffmpeg")
    with pytest.raises(FfmpegNotFoundError, match="MELLOW_FFMPEG"):
        decode.find_ffmpeg()
    monkeypatch.delenv("MELLOW_FFMPEG")
    monkeypatch.setattr(decode.shutil, "which", lambda name: None)
    import imageio_ffmpeg

    def no_binary():
        raise RuntimeError("no ffmpeg exe could be found")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    decode.find_ffmpeg.cache_clear()
    with pytest.raises(FfmpegNotFoundError, match="apt-get install ffmpeg"):
        decode.find_ffmpeg()
    decode.find_ffmpeg.cache_clear()


@pytest.mark.parametrize("backend", ["pyav", "cli"])
def test_decode_failures_read_as_sentences(tmp_path, backend):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioDecodeError) as raised:
        decode_audio(empty, 16000, backend=backend)
    assert str(raised.value) == f"{empty}: empty file (0 bytes)"
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioDecodeError) as raised:
        decode_audio(corrupt, 16000, backend=backend)
    message = str(raised.value)
    assert message.startswith(f"{corrupt}: ") and "Errno" not in message and "[" not in message
    assert "not audio that ffmpeg can read" in message
