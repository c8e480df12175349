"""Precompute at scale: several processes (torchrun, SLURM job arrays), and a kill -9 in the middle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mellow.files import read_json, read_jsonl

from conftest import assert_same_store

REPO = Path(__file__).resolve().parents[2]


def _precompute_command(dataset: Path, root: Path, *extra: str) -> list[str]:
    return [str(REPO / "stages" / "01_precompute.py"), str(dataset), "--encoder", "mel", "--tokens", "4",
            "--clip-seconds", "3", "--shard-clips", "4", "--store-root", str(root), *extra]


def _run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def _store(root: Path) -> Path:
    [store] = [p for p in (root / "synth").iterdir() if p.is_dir()]
    return store


@pytest.mark.slow
def test_torchrun_and_slurm_array_split_the_shards_and_equal_one_process(tiny_dataset, tmp_path):
    single, ranks, array = tmp_path / "single", tmp_path / "torchrun", tmp_path / "array"
    _run([sys.executable, *_precompute_command(tiny_dataset, single)])
    completed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      *_precompute_command(tiny_dataset, ranks)])
    assert "rank 0/2: " in completed.stdout and completed.stdout.count("precomputed") == 1  # one finalizer
    assert_same_store(_store(single), _store(ranks))
    shards = sorted(read_json(p)["shard"] for p in (_store(ranks) / "parts").glob("*.json"))
    assert shards == list(range(6))
    # a SLURM job array: tasks run one after the other here; the second one finalizes
    first = _run([sys.executable, *_precompute_command(tiny_dataset, array)],
                 env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"})
    assert "finished its shards" in first.stdout and not (_store(array) / "index.jsonl").exists()
    assert sorted(p.name for p in (_store(array) / "parts").iterdir()) == [
        "shard-00000.json", "shard-00002.json", "shard-00004.json"]
    second = _run([sys.executable, *_precompute_command(tiny_dataset, array)],
                  env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"})
    assert "rank 1/2: precomputed" in second.stdout
    assert_same_store(_store(single), _store(array))


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_store(tiny_dataset, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _run([sys.executable, *_precompute_command(tiny_dataset, reference)])
    # slow the run down (one decode at a time, batch of 1) so it can be killed between shards
    command = [sys.executable, *_precompute_command(tiny_dataset, killed, "--decode-workers", "1",
                                                    "--batch-size", "1")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("synth/*/parts/shard-00001.json")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    store = _store(killed)
    done = sorted(p.name for p in (store / "parts").iterdir())
    assert 2 <= len(done) < 6, done  # really interrupted part-way
    assert not read_json(store / "meta.json")["complete"]
    completed = _run(command)
    assert f"{6 - len(done)} shard(s) computed, {len(done)} already done" in completed.stdout
    assert_same_store(_store(reference), store)


def _float_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """A 32-bit float WAV written by hand (the stdlib `wave` module writes integer PCM only)."""
    import struct

    data = samples.astype("<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, sample_rate, sample_rate * 4, 4, 32) + b"data" + struct.pack("<I", len(data))
    path.write_bytes(header + data)


def test_every_kind_of_bad_input_is_skipped_with_its_reason(tmp_path):
    from mellow.audio.decode import encode_audio_file
    from mellow.encode import precompute
    from mellow.files import write_jsonl_atomic
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.store.reader import EmbeddingStore
    from mellow.store.writer import StoreConfig

    dataset = tmp_path / "bad"
    dataset.mkdir()
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    encode_audio_file(tone, 16000, dataset / "good.wav")
    encode_audio_file(np.tile(tone, 60), 16000, dataset / "long.flac")
    encode_audio_file(np.tile(tone, 3), 16000, dataset / "whole.flac")
    truncated = (dataset / "whole.flac").read_bytes()
    (dataset / "truncated.flac").write_bytes(truncated[: len(truncated) // 3])
    (dataset / "empty.wav").write_bytes(b"")
    (dataset / "text.mp3").write_text("this is not audio\n" * 50)
    _float_wav(dataset / "zero_length.wav", np.zeros(0))
    _float_wav(dataset / "silent.wav", np.zeros(16000))
    _float_wav(dataset / "nan.wav", np.where(np.arange(16000) % 100 == 0, np.nan, tone))
    _float_wav(dataset / "short.wav", tone[:320])
    expected = {
        "good": "ok", "long": "ok", "missing": "no such file", "empty": "empty file (0 bytes)",
        "truncated": "truncated", "text": "not audio that ffmpeg can read", "zero_length": "zero samples",
        "silent": "digital silence", "nan": "NaN",
        "short": "shorter than --min-seconds", "url": "Connection refused",
    }
    records = [{"id": name, "path": f"{name}.{ext}", "duration": duration} for name, ext, duration in [
        ("good", "wav", 1.0), ("long", "flac", 60.0), ("missing", "wav", 1.0), ("empty", "wav", 1.0),
        ("truncated", "flac", 3.0), ("text", "mp3", 1.0), ("zero_length", "wav", None),
        ("silent", "wav", 1.0), ("nan", "wav", 1.0), ("short", "wav", 0.02)]]
    records.append({"id": "url", "path": "http://127.0.0.1:9/nothing-listens-here.wav", "duration": 1.0})
    write_jsonl_atomic(dataset / "audio.jsonl", records)
    config = PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="mel", clip_seconds=2.0, tokens=4),
                              store=StoreConfig(root=tmp_path / "shards", shard_clips=4), max_failures=1.0)
    result = precompute.run(config)
    statuses = {r["id"]: r["status"] for r in read_jsonl(result.store_path / "index.jsonl")}
    for name, reason in expected.items():
        if reason == "ok":
            assert statuses[name] == "ok", (name, statuses[name])
        else:
            assert statuses[name].startswith("failed: ") and reason in statuses[name], (name, statuses[name])
    report = read_json(result.store_path / "report.json")
    assert report["counts"] == {"rows": 11, "ok": 2, "failed": 9} and len(report["failures"]) == 9
    assert sorted(EmbeddingStore(result.store_path).rows) == ["good", "long"]


def test_a_grown_manifest_adds_rows_and_keeps_the_old_ones(tiny_dataset, tmp_path):
    import shutil

    from mellow.encode import precompute
    from mellow.files import write_jsonl_atomic
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.store.writer import StoreConfig

    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset)
    records = read_jsonl(dataset / "audio.jsonl")
    write_jsonl_atomic(dataset / "audio.jsonl", records[:16])

    def run(root: Path):
        config = PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                                  store=StoreConfig(root=root, shard_clips=6))
        return precompute.run(config)

    first = run(tmp_path / "grown")
    before = zarr.open(str(first.store_path / "store.zarr"), mode="r")["emb"][:]
    assert before.shape[0] == 16
    write_jsonl_atomic(dataset / "audio.jsonl", records)
    grown = run(tmp_path / "grown")
    assert (grown.computed_shards, grown.skipped_shards) == (2, 2)  # the partial old shard 2, and shard 3
    after = zarr.open(str(grown.store_path / "store.zarr"), mode="r")["emb"][:]
    np.testing.assert_array_equal(after[:16], before)
    assert [r["id"] for r in read_jsonl(grown.store_path / "index.jsonl")] == [r["id"] for r in records]
    assert_same_store(run(tmp_path / "scratch").store_path, grown.store_path)
    write_jsonl_atomic(dataset / "audio.jsonl", list(reversed(records)))  # not an append: refused
    import pytest

    from mellow.store.writer import StoreMismatchError
    with pytest.raises(StoreMismatchError, match="appended at the end"):
        run(tmp_path / "grown")


def test_center_crop_seeks_to_the_middle_of_a_long_file(tmp_path):
    from mellow.audio.decode import encode_audio_file
    from mellow.encode import precompute
    from mellow.encode.encoders import build_encoder
    from mellow.files import write_jsonl_atomic
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.store.reader import EmbeddingStore
    from mellow.store.writer import StoreConfig

    dataset = tmp_path / "long"
    dataset.mkdir()
    t = np.arange(2 * 16000) / 16000
    low, high = 0.2 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 1760 * t)
    encode_audio_file(np.concatenate([low, high, low]).astype(np.float32), 16000, dataset / "clip.flac")
    write_jsonl_atomic(dataset / "audio.jsonl", [{"id": "clip", "path": "clip.flac", "duration": 6.0}])
    encoder_config = EncoderConfig(name="mel", clip_seconds=2.0, tokens=4, crop="center")
    result = precompute.run(PrecomputeConfig(dataset=dataset, encoder=encoder_config,
                                             store=StoreConfig(root=tmp_path / "shards")))
    stored = EmbeddingStore(result.store_path).load_all()[0][0, 0].astype(np.float32)
    encoder = build_encoder(encoder_config)
    middle, _ = encoder.encode(high.astype(np.float32)[None], np.array([1.0]))
    edge, _ = encoder.encode(low.astype(np.float32)[None], np.array([1.0]))
    assert np.abs(stored - middle[0]).mean() < 0.1 * np.abs(stored - edge[0]).mean()


def test_a_truncated_file_whose_later_views_are_gone_is_called_truncated(tmp_path):
    """A 12 s file cut to its first third, whose manifest still says 12 s: the views at 5 and 10 s seek past
    its end and decode nothing; that is reported as truncation, not as an empty file."""
    from mellow.audio.decode import AudioDecodeError, encode_audio_file
    from mellow.audio.views import decode_views
    from mellow.settings import EncoderConfig

    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(12 * 16000) / 16000)).astype(np.float32)
    encode_audio_file(tone, 16000, tmp_path / "whole.wav")
    whole = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 3])
    encoder = EncoderConfig(name="mel", clip_seconds=2.0, tokens=4, views=3)
    assert len(decode_views({"path": "whole.wav", "duration": 12.0}, str(tmp_path / "whole.wav"), encoder, 0.1,
                            16000)) == 3
    with pytest.raises(AudioDecodeError, match=r"cut.wav: truncated: no audio at 5.00 s where the manifest says "
                                               r"it lasts 12.00 s"):
        decode_views({"path": "cut.wav", "duration": 12.0}, str(tmp_path / "cut.wav"), encoder, 0.1, 16000)


def test_in_process_and_cli_decoding_make_the_same_store(tiny_dataset, tmp_path, monkeypatch):
    """The synthetic set's wav, flac, mp3 and ogg clips at 16-48 kHz, mono and stereo, through both decoders."""
    from mellow.encode import precompute
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.store.writer import StoreConfig

    stores = {}
    for backend in ("cli", "pyav"):
        monkeypatch.setenv("MELLOW_DECODER", backend)
        config = PrecomputeConfig(dataset=tiny_dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                                  store=StoreConfig(root=tmp_path / backend, shard_clips=8))
        stores[backend] = precompute.run(config).store_path
        decoder = read_json(stores[backend] / "meta.json")["decoder"]
        assert decoder.startswith({"cli": "ffmpeg cli", "pyav": "pyav"}[backend])
    assert_same_store(stores["cli"], stores["pyav"])


@pytest.mark.slow
def test_two_precompute_processes_started_by_mistake_make_one_processs_store(tiny_dataset, tmp_path):
    """Two shells, the same command, no rank split: each shard is computed once, by whichever process claims it
    first, and the store is the one a single process makes."""
    reference, twice = tmp_path / "reference", tmp_path / "twice"
    _run([sys.executable, *_precompute_command(tiny_dataset, reference)])
    command = [sys.executable, *_precompute_command(tiny_dataset, twice, "--decode-workers", "1", "--batch-size", "1")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    computed = [int(output.split(" shard(s) computed")[0].split()[-1]) for output in outputs]
    assert sum(computed) == 6, outputs  # 24 clips in shards of 4: none computed twice
    assert sum("precomputed" in output for output in outputs) == 1  # one of them finalized
    assert_same_store(_store(reference), _store(twice))
