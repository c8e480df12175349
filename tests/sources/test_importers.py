"""00_prepare importers, each on fixture data written in the exact published layout (real audio files made with
ffmpeg), then 01_precompute on the result: Mellow/ReasonAQA JSON, Clotho, AudioCaps and a folder + CSV/JSONL."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mellow.audio.decode import encode_audio_file
from mellow.cli import app
from mellow.files import read_json, read_jsonl
from mellow.sources.reasonaqa import MELLOW_PROMPTS
from mellow.store.reader import EmbeddingStore

RATE = 16000
PRECOMPUTE = ["--encoder", "mel", "--clip-seconds", "4", "--tokens", "4", "--shard-clips", "4"]


def tone(path: Path, seconds: float, hertz: float | list[float]) -> Path:
    """A sine (or one sine per second-long piece, for a list) written in the format the suffix names."""
    pieces = hertz if isinstance(hertz, list) else [hertz]
    length = int(seconds * RATE) // len(pieces)
    time = np.arange(length) / RATE
    wave = np.concatenate([0.3 * np.sin(2 * np.pi * f * time) for f in pieces]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_audio_file(wave, RATE, path)
    return path


def invoke(*arguments: str, code: int = 0):
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == code, result.output
    return result


def prepare(source: str, root: Path, *options: str) -> tuple[Path, dict]:
    invoke("prepare", "--source", source, "--name", "imported", "--root", root, *options)
    dataset = root / "imported"
    return dataset, read_json(dataset / "prepare.json")


def examples(dataset: Path) -> dict[str, list[dict]]:
    return {split: read_jsonl(dataset / f"{split}.jsonl") for split in ("train", "val", "test")}


def rows_by_id(store_path: Path) -> dict[str, np.ndarray]:
    store = EmbeddingStore(store_path)
    emb, _ = store.load_all()
    return {clip: emb[row] for clip, row in store.rows.items()}


def precompute(dataset: Path, shards: Path, *options: str) -> Path:
    invoke("precompute", dataset, *PRECOMPUTE, "--store-root", shards, *options)
    return next((shards / dataset.name).iterdir())


MELLOW_ROWS = [
    {"taskname": "audiocaps", "filepath1": "audio/a.wav", "filepath2": "audio/b.flac", "caption1": "A Dog barks.",
     "caption2": "rain falls", "input": "caption both audios", "answer": "", "subtype": "caption_both"},
    {"taskname": "clotho", "filepath1": "audio\\b.flac", "filepath2": "", "caption1": "Rain falls.",
     "caption2": "", "input": "caption first audio", "answer": "", "subtype": ""},
    {"taskname": "reasonaqa", "filepath1": "audio/a.wav", "filepath2": "audio/b.flac", "caption1": "",
     "caption2": "", "input": "explain the difference in detail", "answer": "The first is a dog, the second rain.",
     "subtype": "difference_detail"},
    {"taskname": "reasonaqa", "filepath1": "audio/a.wav", "filepath2": "", "caption1": "", "caption2": "",
     "input": "Is there an Animal?", "answer": "Yes", "subtype": "binary"},
    {"taskname": "reasonaqa", "filepath1": "audio/gone.wav", "filepath2": "", "caption1": "", "caption2": "",
     "input": "Is it loud?", "answer": "no", "subtype": "binary"},
]


@pytest.fixture()
def reasonaqa(tmp_path) -> Path:
    """A ReasonAQA-style release: audio/ and one JSON list per split, named as the release names them."""
    folder = tmp_path / "reasonaqa"
    tone(folder / "audio" / "a.wav", 3.0, 440)
    tone(folder / "audio" / "b.flac", 2.0, 880)
    (folder / "reasonaqa_train.json").write_text(json.dumps(MELLOW_ROWS))
    (folder / "reasonaqa_test.json").write_text("\n".join(json.dumps(row) for row in MELLOW_ROWS[2:4]))  # JSONL
    return folder


def test_mellow_json_imports_losslessly_with_its_prompt_conventions(reasonaqa, tmp_path):
    source = f"mellow:{reasonaqa / 'reasonaqa_train.json'},{reasonaqa / 'reasonaqa_test.json'}"
    dataset, report = prepare(source, tmp_path / "datasets")
    found = examples(dataset)
    train = found["train"]
    assert [e["source"] for e in train] == MELLOW_ROWS[:4]  # every field of every imported row, as given
    assert [e["task"] for e in train] == ["caption", "caption", "difference", "yes_no"]
    assert [e["subtask"] for e in train] == ["caption_both", "clotho", "difference_detail", "binary"]
    assert train[0]["answer"] == "The audio 1 is a dog barks. The audio 2 is rain falls."
    assert train[1]["answer"] == "The audio 1 is rain falls."  # no doubled full stop
    assert train[2]["answer"] == "The first is a dog, the second rain."
    assert (train[3]["prompt"], train[3]["answer"]) == ("is there an animal?", "yes")
    assert train[0]["prompt"] in MELLOW_PROMPTS["caption both audios"]
    assert train[2]["prompt"] in MELLOW_PROMPTS["explain the difference in detail"]
    # the Windows-style path names the same clip; an empty filepath2 is "no second audio", not a random clip
    assert train[1]["audio1"] == train[0]["audio2"] and train[1]["audio2"] is None
    assert [e["source"] for e in found["test"]] == MELLOW_ROWS[2:4] and not found["val"]
    records = read_jsonl(dataset / "audio.jsonl")
    assert sorted(Path(r["path"]).name for r in records) == ["a.wav", "b.flac"]
    assert all(Path(r["path"]).is_absolute() and len(r["sha256"]) == 64 for r in records)
    [missing] = report["failures"]
    assert missing["path"].endswith("audio/gone.wav") and missing["needed_by"] == ["reasonaqa_train.json row 5"]
    assert report["counts"] == {"clips": 2, "train_examples": 4, "val_examples": 0, "test_examples": 2,
                                "skipped": 1}
    # the prompt paraphrases are drawn from the seed: the same seed gives the same manifests
    again, _ = prepare(source, tmp_path / "again")
    assert examples(again) == found

    store = precompute(dataset, tmp_path / "shards")
    assert set(rows_by_id(store)) == {r["id"] for r in records}


def test_mellow_source_errors_name_the_fix(reasonaqa, tmp_path):
    unnamed = reasonaqa / "part1.json"
    unnamed.write_text(json.dumps(MELLOW_ROWS))
    result = invoke("prepare", "--source", f"mellow:{unnamed}", "--root", tmp_path, code=2)
    assert "cannot tell the split" in result.output and "train=<file>" in result.output
    named = invoke("prepare", "--source", f"mellow:val={unnamed}", "--name", "named", "--root", tmp_path)
    assert "1 skipped" in named.output and read_jsonl(tmp_path / "named" / "val.jsonl")
    broken = reasonaqa / "broken_train.json"
    broken.write_text("{not json")
    result = invoke("prepare", "--source", f"mellow:{broken}", "--root", tmp_path, code=2)
    assert "neither a JSON list nor JSON lines" in result.output
    result = invoke("prepare", "--source", f"mellow:{reasonaqa / 'reasonaqa_train.json'}", "--audio-root",
                    tmp_path / "nowhere", "--root", tmp_path, code=2)
    assert "--audio-root" in result.output
    result = invoke("prepare", "--source", f"mellow:{reasonaqa / 'reasonaqa_train.json'}", "--audio-root",
                    tmp_path, "--root", tmp_path, code=2)  # a wrong audio root: nothing is found
    assert "no audio file found" in result.output and "check --audio-root" in result.output


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_clotho_layout(tmp_path):
    """Clotho's archives extract to development/, validation/, evaluation/ and three caption CSVs with five
    captions per file; its file names hold spaces and commas."""
    root = tmp_path / "clotho"
    header = ["file_name"] + [f"caption_{n}" for n in range(1, 6)]
    layout = {"development": ["Birds, morning.wav", "Train passing.wav", "Missing file.wav"],
              "validation": ["Waves.wav"], "evaluation": ["Door knock.wav"]}
    for folder, names in layout.items():
        for number, name in enumerate(names):
            if name != "Missing file.wav":
                tone(root / folder / name, 1.5, 300 + 100 * number)
        write_csv(root / f"clotho_captions_{folder}.csv", header,
                  [[name] + [f"{name[:-4].lower()} caption {n}" for n in range(1, 6)] for name in names])
    dataset, report = prepare(f"clotho:{root}", tmp_path / "datasets")
    found = examples(dataset)
    # training learns all five captions of a clip; validation and test score one answer against the five
    assert [len(found[split]) for split in ("train", "val", "test")] == [10, 1, 1]
    birds = [e for e in found["train"] if e["audio1"] == "development/Birds, morning"]
    assert [e["answer"] for e in birds] == [f"birds, morning caption {n}" for n in range(1, 6)]
    assert all(e["references"] == [e["answer"] for e in birds] and e["task"] == "caption" for e in birds)
    assert found["test"][0]["references"] == [f"door knock caption {n}" for n in range(1, 6)]
    assert report["failures"][0]["path"].endswith("development/Missing file.wav")
    assert report["failures"][0]["needed_by"] == ["clotho_captions_development.csv row 3"]
    store = precompute(dataset, tmp_path / "shards")
    assert set(rows_by_id(store)) == {"development/Birds, morning", "development/Train passing",
                                      "validation/Waves", "evaluation/Door knock"}


def test_clotho_errors(tmp_path):
    result = invoke("prepare", "--source", f"clotho:{tmp_path}", "--root", tmp_path / "d", code=2)
    assert "clotho_captions_" in result.output and "extracted" in result.output
    result = invoke("prepare", "--source", f"clotho:{tmp_path / 'nowhere'}", "--root", tmp_path / "d", code=2)
    assert "does not exist" in result.output
    # a mislabelled file: AudioCaps' CSV saved under Clotho's name
    write_csv(tmp_path / "clotho_captions_development.csv", ["audiocap_id", "youtube_id", "start_time", "caption"],
              [[1, "abc", 0, "a dog"]])
    result = invoke("prepare", "--source", f"clotho:{tmp_path}", "--root", tmp_path / "d", code=2)
    assert "no file_name column" in result.output and "right file" in result.output


def test_audiocaps_cuts_clips_from_longer_files_by_start_time(tmp_path):
    """AudioCaps CSVs (audiocap_id, youtube_id, start_time, caption) over whole-video audio named by YouTube
    id: the 4-second encoder crop of the clip at start_time 3 equals that of a file holding only seconds 3-7."""
    root = tmp_path / "audiocaps"
    tone(root / "audio" / "YvideoA.wav", 9.0, [200, 200, 200, 700, 700, 700, 700, 1500, 1500])
    tone(root / "audio" / "videoB.flac", 4.0, 900)
    tone(root / "audio" / "videoC_30.wav", 4.0, 500)  # already cut, named <id>_<start>
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    write_csv(root / "train.csv", header, [[1, "videoA", 3, "a high tone"], [2, "videoB", 0, "a beep"],
                                           [3, "videoGone", 10, "lost"], [4, "videoA", "x", "bad start"]])
    write_csv(root / "val.csv", header, [[5, "videoC", 30, "a low tone"]])
    write_csv(root / "test.csv", header, [[6, "videoA", 0, "a low hum"], [7, "videoA", 0, "humming"]])
    dataset, report = prepare(f"audiocaps:{root}", tmp_path / "datasets")
    found = examples(dataset)
    assert [e["references"] for e in found["test"]] == [["a low hum", "humming"]]  # one clip, its captions
    records = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    assert records["videoA_3"]["start"] == 3.0 and records["videoA_3"]["duration"] == 10.0
    assert records["videoA"]["start"] == 0.0 and records["videoA"]["path"] == records["videoA_3"]["path"]
    assert "start" not in records["videoC_30"] and records["videoC_30"]["path"].endswith("videoC_30.wav")
    assert {f.get("path", f.get("where")) for f in report["failures"]} == {
        str(root / "videoGone.wav"), "train.csv row 4"}

    reference = tmp_path / "reference"
    tone(reference / "piece.wav", 4.0, 700)
    (reference / "list.csv").write_text("path\npiece.wav\n")
    piece, _ = prepare(f"folder:{reference / 'list.csv'}", tmp_path / "ref-datasets")
    rows = rows_by_id(precompute(dataset, tmp_path / "shards"))
    # videoB's clip is 4 s of a nominal 10: a clip at the end of its video, encoded, not reported as truncated
    assert set(rows) == {"videoA_3", "videoB", "videoC_30", "videoA"}
    expected = rows_by_id(precompute(piece, tmp_path / "ref-shards"))["piece"]
    np.testing.assert_allclose(rows["videoA_3"].astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert not np.allclose(rows["videoA"].astype(np.float32), expected.astype(np.float32), atol=0.1)


def test_folder_with_csv_and_jsonl(tmp_path):
    folder = tmp_path / "mine"
    tone(folder / "clips" / "one.mp3", 2.0, 440)
    tone(folder / "clips" / "two.ogg", 2.0, 660)
    tone(folder / "clips" / "long.wav", 6.0, [100, 100, 800, 800, 800, 800])
    (folder / "meta.csv").write_text(
        "file_name,caption,split,prompt,answer\n"
        "clips/one.mp3,a tone,train,Is it a tone?,yes\n"
        "clips/two.ogg,a higher tone,test,,\n"
        "clips/absent.wav,nothing,train,,\n")
    dataset, report = prepare(f"folder:{folder / 'meta.csv'}", tmp_path / "datasets")
    found = examples(dataset)
    assert [(e["task"], e["audio1"], e["answer"]) for e in found["train"]] == [
        ("caption", "clips/one", "a tone"), ("yes_no", "clips/one", "yes")]
    assert [e["audio1"] for e in found["test"]] == ["clips/two"]
    assert report["failures"][0]["path"].endswith("clips/absent.wav")

    lines = [{"path": "clips/one.mp3", "captions": ["first", "second"], "split": "validation"},
             {"path": "clips/long.wav", "start": 2, "duration": 4, "path2": "clips/two.ogg",
              "question": "Which is higher?", "answer": "the second", "task": "comparison"},
             {"path": "clips/two.ogg", "start": "soon"}]
    (folder / "meta.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset, report = prepare(f"folder:{folder / 'meta.jsonl'}", tmp_path / "jsonl", "--val-fraction", "0.2",
                              "--test-fraction", "0.2")
    every = [e for rows in examples(dataset).values() for e in rows]
    assert any(e["split"] == "val" and e["references"] == ["first", "second"] for e in every)
    [question] = [e for e in every if e["task"] == "comparison"]
    assert (question["audio1"], question["audio2"], question["prompt"]) == ("clips/long_2", "clips/two",
                                                                            "Which is higher?")
    assert report["failures"] == [{"where": "meta.jsonl row 3", "reason": "start 'soon': not a number of seconds"}]
    records = {r["id"]: r for r in read_jsonl(dataset / "audio.jsonl")}
    assert (records["clips/long_2"]["start"], records["clips/long_2"]["duration"]) == (2.0, 4.0)
    result = invoke("prepare", "--source", f"folder:{folder / 'clips' / 'one.mp3'}", "--root", tmp_path, code=2)
    assert "neither a JSON list nor JSON lines" in result.output
    (folder / "nopath.csv").write_text("name,caption\none.mp3,x\n")
    result = invoke("prepare", "--source", f"folder:{folder / 'nopath.csv'}", "--root", tmp_path, code=2)
    assert "audio path column" in result.output and "file_name" in result.output


def test_unknown_source_kind_is_refused(tmp_path):
    result = invoke("prepare", "--source", "kaggle:something", "--root", tmp_path, code=2)
    assert "'kaggle:something' is not supported" in result.output
    assert "mellow:<json>[,...]" in result.output and "audiocaps:<folder>" in result.output


def test_label_columns_of_a_folder_manifest_become_closed_label_tasks(tmp_path):
    folder = tmp_path / "speech"
    for name, hertz in (("a", 300), ("b", 500), ("c", 700), ("d", 900)):
        tone(folder / f"{name}.wav", 1.5, hertz)
    (folder / "labels.csv").write_text("path,emo,split\n"
                                       "a.wav,Joy,train\n"
                                       "b.wav,anger;Surprise,train\n"
                                       "c.wav,neutral,test\n"
                                       "d.wav,,test\n")  # no label: no emotion example for it
    dataset, report = prepare(f"folder:{folder / 'labels.csv'}", tmp_path / "datasets", "--label-field", "emo",
                              "--label-task", "emotion")
    assert report["label_tasks"] == {"emotion": ["anger", "joy", "neutral", "surprise"]}
    assert report["config"]["label_field"] == "emo" and report["config"]["label_task"] == "emotion"
    found = examples(dataset)
    assert [(e["audio1"], e["answer"], e["references"]) for e in found["train"]] == [
        ("a", "joy", ["joy"]), ("b", "anger", ["anger", "surprise"]), ("b", "surprise", ["anger", "surprise"])]
    assert [(e["audio1"], e["answer"]) for e in found["test"]] == [("c", "neutral")]
    assert found["test"][0]["prompt"] == ("Which emotion does the audio express? Answer with one of: anger, joy, "
                                          "neutral, surprise.")

    for options, message in ((["--label-field", "emotion"], "--label-field emotion: "),
                             (["--label-field", "emo", "--label-task", "caption"], "--label-task 'caption'"),
                             (["--label-field", "emo", "--label-task", "a,b"], "names 2 task(s) for 1")):
        result = CliRunner().invoke(app, ["prepare", "--source", f"folder:{folder / 'labels.csv'}", "--name", "x",
                                          "--root", str(tmp_path / "bad"), *options])
        assert result.exit_code == 2 and message in result.output, result.output


def test_several_captions_per_clip_in_a_csv_from_repeated_rows_or_a_json_list(tmp_path):
    folder = tmp_path / "mine"
    for name, hertz in (("one", 440), ("two", 660), ("three", 880)):
        tone(folder / f"{name}.wav", 1.5, hertz)
    (folder / "meta.csv").write_text(
        "path,caption,split\n"
        "one.wav,a tone,test\n"
        "one.wav,a beep,test\n"  # the same file again: another caption of the same clip
        "two.wav,a higher tone,train\n"
        "two.wav,a whistle,train\n")
    dataset, _ = prepare(f"folder:{folder / 'meta.csv'}", tmp_path / "repeated")
    found = examples(dataset)
    assert [(e["audio1"], e["answer"], e["references"]) for e in found["test"]] == [
        ("one", "a tone", ["a tone", "a beep"])]  # scored once, against both
    assert [(e["answer"], e["references"]) for e in found["train"]] == [
        ("a higher tone", ["a higher tone", "a whistle"]), ("a whistle", ["a higher tone", "a whistle"])]
    assert len(read_jsonl(dataset / "audio.jsonl")) == 2

    (folder / "list.csv").write_text('path,captions,split\nthree.wav,"[""a tone"", ""a beep""]",test\n')
    dataset, _ = prepare(f"folder:{folder / 'list.csv'}", tmp_path / "listed")
    assert [e["references"] for e in examples(dataset)["test"]] == [["a tone", "a beep"]]
    for cell in ("a tone;a beep", "a tone|a beep"):  # not a list: refused, not taken as one caption
        (folder / "joined.csv").write_text(f"path,captions\nthree.wav,{cell}\n")
        result = invoke("prepare", "--source", f"folder:{folder / 'joined.csv'}", "--name", "x", "--root",
                        tmp_path / "joined", code=2)
        said = " ".join(result.output.split())
        assert "joined.csv row 1: captions" in said and "JSON list" in said and "Traceback" not in said


def test_a_csv_without_a_known_content_column_is_an_error_listing_the_columns(tmp_path):
    folder = tmp_path / "mine"
    tone(folder / "one.wav", 1.5, 440)
    (folder / "meta.csv").write_text("file,text\none.wav,a tone\n")
    result = invoke("prepare", "--source", f"folder:{folder / 'meta.csv'}", "--name", "x", "--root", tmp_path,
                    code=2)
    said = " ".join(result.output.split())
    assert "found: file, text" in said and "caption" in said and "prompt" in said and "--label-field" in said
    assert not (tmp_path / "x" / "prepare.json").exists()


def test_an_empty_split_is_a_warning_with_the_counts(tmp_path):
    folder = tmp_path / "mine"
    lines = ["path,caption"]
    for number in range(3):
        tone(folder / f"{number}.wav", 1.0, 300 + 100 * number)
        lines.append(f"{number}.wav,tone {number}")
    (folder / "meta.csv").write_text("\n".join(lines) + "\n")
    result = invoke("prepare", "--source", f"folder:{folder / 'meta.csv'}", "--name", "x", "--root", tmp_path)
    said = " ".join(result.output.split())
    counts = {split: len(rows) for split, rows in examples(tmp_path / "x").items()}
    empty = [split for split, count in counts.items() if count == 0]
    assert empty  # three clips cannot fill three splits at the default fractions
    verb = "splits are" if len(empty) > 1 else "split is"
    assert f"warning: the {' and the '.join(empty)} {verb} empty" in said
    assert f"{counts['train']} train, {counts['val']} val, {counts['test']} test" in said


def test_a_missing_file_is_reported_with_its_data_row_number(tmp_path):
    folder = tmp_path / "mine"
    tone(folder / "one.wav", 1.5, 440)
    (folder / "meta.csv").write_text("path,caption\none.wav,a tone\ngone.wav,nothing\n")
    _, report = prepare(f"folder:{folder / 'meta.csv'}", tmp_path / "datasets")
    assert report["failures"][0]["needed_by"] == ["meta.csv row 2"]  # the second data row


def test_a_source_without_a_name_is_named_after_its_folder(tmp_path):
    folder = tmp_path / "birds"
    tone(folder / "one.wav", 1.5, 440)
    (folder / "manifest.csv").write_text("path,caption\none.wav,a bird\n")
    result = invoke("prepare", "--source", f"folder:{folder / 'manifest.csv'}", "--root", tmp_path / "datasets")
    said = " ".join(result.output.split())
    assert (tmp_path / "datasets" / "birds" / "prepare.json").is_file()
    assert not (tmp_path / "datasets" / "synth").exists()
    assert "dataset name birds" in said and "--name" in said
