"""hf: sources: datasets in the Hugging Face layout (Parquet shards, save_to_disk Arrow shards, the HF cache),
written by the `datasets` library itself and by plain pyarrow, prepared and precomputed with the audio left in
the shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import read_json, read_jsonl, write_jsonl_atomic
from mellow.manifests import ManifestError, read_audio_records

from conftest import invoke_ok, rows_by_id

datasets = pytest.importorskip("datasets")

PRECOMPUTE = ["--encoder", "mel", "--clip-seconds", "3", "--tokens", "4", "--shard-clips", "8"]
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def _clips(tiny_dataset: Path) -> dict[str, list[dict]]:
    """The tiny dataset's clips per split as Hub rows: id, audio {bytes, path}, captions, a label."""
    captions = {e["audio1"]: e["references"] for split in ("train", "val", "test")
                for e in read_jsonl(tiny_dataset / f"{split}.jsonl") if e["task"] == "caption"}
    rows: dict[str, list[dict]] = {split: [] for split in HF_SPLITS}
    for number, record in enumerate(read_jsonl(tiny_dataset / "audio.jsonl")):
        rows[record["split"]].append({
            "id": record["id"], "audio": {"bytes": (tiny_dataset / record["path"]).read_bytes(),
                                          "path": Path(record["path"]).name},
            "captions": captions.get(record["id"], []), "mood": ["calm", "tense"][number % 2]})
    return rows


@pytest.fixture(scope="module")
def hub_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset written by `datasets`: Parquet shards in data/ (row groups of 3 rows) and the same
    splits with save_to_disk."""
    folder = tmp_path_factory.mktemp("hub")
    splits, clips = {}, _clips(tiny_dataset)
    for split, name in HF_SPLITS.items():
        rows = clips[split]
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        splits[name] = datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())
        (folder / "parquet" / "data").mkdir(parents=True, exist_ok=True)
        splits[name].to_parquet(str(folder / "parquet" / "data" / f"{name}-00000-of-00001.parquet"), batch_size=3)
    datasets.DatasetDict(splits).save_to_disk(str(folder / "saved"))
    return folder


def test_parquet_written_by_datasets_prepares_and_precomputes_like_the_plain_files(hub_dataset, tiny_dataset,
                                                                                  mel_store, tmp_path):
    assert pq.ParquetFile(hub_dataset / "parquet/data/train-00000-of-00001.parquet").metadata.num_row_groups > 2
    invoke_ok("prepare", "--source", f"hf:{hub_dataset / 'parquet'}", "--name", "hub", "--root",
            str(tmp_path / "datasets"), "--label-field", "mood")
    dataset = tmp_path / "datasets" / "hub"
    records = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    original = {r["id"]: r for r in read_jsonl(tiny_dataset / "audio.jsonl")}
    assert records.keys() == original.keys()
    for clip, record in records.items():  # the bytes of the very same file; the split from the shard's name
        assert record["sha256"] == original[clip]["sha256"] and record["split"] == original[clip]["split"]
        assert record["parquet"].endswith(f"{HF_SPLITS[record['split']]}-00000-of-00001.parquet")
    prepared = read_json(dataset / "prepare.json")
    assert prepared["label_tasks"] == {"mood": ["calm", "tense"]} and not prepared["failures"]
    examples = [e for split in ("train", "val", "test") for e in read_jsonl(dataset / f"{split}.jsonl")]
    assert {e["task"] for e in examples} == {"caption", "mood"}
    test_captions = {e["audio1"]: e["references"] for e in read_jsonl(dataset / "test.jsonl") if e["task"] == "caption"}
    original_captions = {e["audio1"]: e["references"] for e in read_jsonl(tiny_dataset / "test.jsonl")
                         if e["task"] == "caption"}
    assert test_captions == original_captions

    invoke_ok("precompute", str(dataset), *PRECOMPUTE, "--store-root", str(tmp_path / "shards"))
    [store_path] = (tmp_path / "shards" / "hub").iterdir()
    from_shards, from_files = rows_by_id(store_path), rows_by_id(mel_store)
    assert from_shards.keys() == from_files.keys()
    for clip, (embedding, valid) in from_files.items():  # decoding bytes from the shard = decoding the file
        np.testing.assert_array_equal(from_shards[clip][0], embedding)
        assert from_shards[clip][1] == valid


def test_splits_the_source_lacks_are_carved_from_its_train_clips(hub_dataset, tiny_dataset, tmp_path):
    """A Hub dataset with train and test only gets a val split from its train clips (and one with train alone, a
    test split too), by a hash of the clip id: stable, and no clip in two splits. Published splits are kept."""
    original = {r["id"]: r["split"] for r in read_jsonl(tiny_dataset / "audio.jsonl")}
    for kept, carved in ((("train", "test"), {"val"}), (("train",), {"val", "test"})):
        folder = tmp_path / "-".join(kept) / "data"
        folder.mkdir(parents=True)
        for split in kept:
            shutil.copy(hub_dataset / "parquet" / "data" / f"{split}-00000-of-00001.parquet", folder)
        result = invoke_ok("prepare", "--source", f"hf:{folder.parent}", "--name", "carved", "--root",
                           str(folder.parent / "datasets"), "--val-fraction", "0.3", "--test-fraction", "0.3")
        for split in carved:
            assert f"has no {split} split: 0.3 of its train clips" in " ".join(result.output.split())
        dataset = folder.parent / "datasets" / "carved"
        splits = {r["id"]: r["split"] for r in read_jsonl(dataset / "audio.jsonl")}
        assert splits.keys() == {clip for clip, split in original.items() if split in kept}
        for clip, split in splits.items():  # a published split stays; a train clip may move to a carved one
            assert split == original[clip] or (original[clip] == "train" and split in carved), (clip, split)
        assert {split for split in splits.values()} == {*kept, *carved}  # each carved split got clips
        for split in ("train", "val", "test"):  # the examples follow their clips
            assert {e["audio1"] for e in read_jsonl(dataset / f"{split}.jsonl")} <= {
                clip for clip, clip_split in splits.items() if clip_split == split}


def test_save_to_disk_shards_and_the_hf_cache_give_the_same_dataset(hub_dataset, tmp_path, monkeypatch):
    invoke_ok("prepare", "--source", f"hf:{hub_dataset / 'parquet'}", "--name", "parquet", "--root",
            str(tmp_path / "datasets"))
    invoke_ok("prepare", "--source", f"hf:{hub_dataset / 'saved'}", "--name", "saved", "--root",
            str(tmp_path / "datasets"))
    cache = tmp_path / "hub-cache"  # a Hub dataset id, read from the HF cache offline
    snapshot = cache / "datasets--someone--tiny-clips" / "snapshots" / ("a" * 40)
    shutil.copytree(hub_dataset / "parquet", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets at start
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    invoke_ok("prepare", "--source", "hf:someone/tiny-clips", "--name", "cached", "--root", str(tmp_path / "datasets"))

    def content(name: str) -> tuple[list, dict]:
        folder = tmp_path / "datasets" / name
        clips = sorted((r["id"], r["sha256"], r["split"]) for r in read_jsonl(folder / "audio.jsonl"))
        return clips, {split: read_jsonl(folder / f"{split}.jsonl") for split in ("train", "val", "test")}

    assert content("saved") == content("parquet") == content("cached")
    assert all(r["parquet"].endswith(".arrow") for r in read_jsonl(tmp_path / "datasets/saved/audio.jsonl"))
    invoke_ok("precompute", str(tmp_path / "datasets" / "saved"), *PRECOMPUTE, "--store-root", str(tmp_path / "shards"))
    assert read_json(next((tmp_path / "shards" / "saved").iterdir()) / "meta.json")["counts"]["ok"] == 24

    absent = CliRunner().invoke(app, ["prepare", "--source", "hf:someone/not-there", "--root", str(tmp_path)])
    assert absent.exit_code == 2 and "HF_HUB_OFFLINE" in absent.output, absent.output
    assert "hf download someone/not-there --repo-type dataset" in absent.output


def test_plain_pyarrow_shards_with_paths_questions_repeated_rows_and_bad_rows(tiny_dataset, tmp_path):
    """Raw bytes in a column named by --columns, rows that only give a path, AudioCaps-style rows repeating a
    clip with another caption, a row without audio, a shard cut short, and a row whose bytes are not audio."""
    records = read_jsonl(tiny_dataset / "audio.jsonl")
    folder = tmp_path / "plain"
    (folder / "train").mkdir(parents=True)
    shutil.copy(tiny_dataset / records[0]["path"], folder / "train" / "beside.flac")
    first, second = (tiny_dataset / records[1]["path"]).read_bytes(), (tiny_dataset / records[2]["path"]).read_bytes()
    table = pa.table({
        "sound": [{"bytes": first, "path": None}, {"bytes": first, "path": None},
                  {"bytes": None, "path": "beside.flac"}, {"bytes": None, "path": "gone.flac"}, None,
                  {"bytes": second, "path": None},
                  {"bytes": b"not audio at all" * 30, "path": None}],
        "clip": ["one", "one", "beside", "gone", "empty", "one", "junk"],
        "text": ["a dog barks", "a dog barks loudly", "rain", "x", "y", "a bell", "noise"],
        "question": [None, "Is a dog barking?", None, None, None, None, None],
        "answer": [None, "yes", None, None, None, None, None]})
    pq.write_table(table, folder / "train" / "part-0.parquet", row_group_size=2)
    (folder / "train" / "part-1.parquet").write_bytes(
        (folder / "train" / "part-0.parquet").read_bytes()[:300])  # cut short: no footer

    invoke_ok("prepare", "--source", f"hf:{folder}", "--columns", "audio=sound,id=clip,caption=text", "--root",
            str(tmp_path / "datasets"), "--name", "plain")
    dataset = tmp_path / "datasets" / "plain"
    clips = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    assert set(clips) == {"one", "beside", "one~2", "junk"}  # the same id with other audio is kept apart
    assert clips["beside"]["path"] == str((folder / "train" / "beside.flac").absolute())
    assert clips["one"]["row"] == 0 and clips["one~2"]["row"] == 5 and {r["split"] for r in clips.values()} == {"train"}
    train = read_jsonl(dataset / "train.jsonl")
    assert sorted(e["answer"] for e in train if e["audio1"] == "one") == ["a dog barks", "a dog barks loudly", "yes"]
    failures = read_json(dataset / "prepare.json")["failures"]
    reasons = {f["where"].split("/")[-1]: f["reason"] for f in failures}
    assert "not a file" in reasons["part-0.parquet row 3"] and "empty" in reasons["part-0.parquet row 4"]
    assert reasons["part-1.parquet"].startswith("reading the file failed")

    result = CliRunner().invoke(app, ["precompute", str(dataset), *PRECOMPUTE, "--store-root",
                                      str(tmp_path / "shards"), "--max-failures", "0.3"])
    assert result.exit_code == 0 and "3 clips ok, 1 failed" in result.output, result.output
    [store_path] = (tmp_path / "shards" / "plain").iterdir()
    statuses = {r["id"]: r["status"] for r in read_jsonl(store_path / "index.jsonl")}
    assert statuses["junk"].startswith(f"failed: {folder / 'train' / 'part-0.parquet'}#6: ")


def test_bad_column_settings_say_what_to_write(hub_dataset, tmp_path):
    for columns, message in (("audio=nope", "no column 'nope'"), ("voice=audio", "not role=column"),
                             ("audio", "not role=column")):
        result = CliRunner().invoke(app, ["prepare", "--source", f"hf:{hub_dataset / 'parquet'}", "--columns",
                                          columns, "--root", str(tmp_path)])
        assert result.exit_code != 0 and message in result.output, result.output
    result = CliRunner().invoke(app, ["prepare", "--source", "synth", "--columns", "audio=x", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "hf: source" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["prepare", "--source", f"hf:{empty}", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "no .parquet or .arrow files" in result.output


def test_a_shard_record_is_data_a_pipe_or_url_in_its_place_is_refused(tmp_path):
    dataset = tmp_path / "edited"
    dataset.mkdir()
    for parquet, row in (("pipe:touch pwned", 0), ("http://example.com/x.parquet", 0), ("x.parquet", -1)):
        write_jsonl_atomic(dataset / "audio.jsonl", [{"id": "a", "path": "x#0", "parquet": parquet, "row": row,
                                                      "column": "audio"}])
        with pytest.raises(ManifestError, match="audio.jsonl:1: .*(local file path|'row' number)"):
            read_audio_records(dataset)
    assert not (tmp_path / "pwned").exists()
