"""MMAU and MMAR: their release files imported as published (fixtures in the exact layouts, with stand-in audio),
a model trained elsewhere scored on them by their own protocol, and the submission file their official scripts
read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mellow.answers import matched_choice, matches_choice
from mellow.audio.decode import encode_audio_file
from mellow.cli import app
from mellow.config import from_names
from mellow.evaluate.benchmark import benchmark_markdown, benchmark_scores, write_submission
from mellow.files import read_json, read_jsonl
from mellow.settings import ModelConfig, TrainConfig
from mellow.train import loop

from conftest import TINY_MODEL

RATE = 16000
CHOICES = ["Dog barking", "Dog growling", "Cat meowing", "Silence"]


def invoke(*arguments: object, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def stand_in_audio(path: Path, hertz: float) -> None:
    time = np.arange(int(1.5 * RATE)) / RATE
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_audio_file((0.3 * np.sin(2 * np.pi * hertz * time)).astype(np.float32), RATE, path)


def mmau_release(folder: Path, name: str = "mmau-test-mini.json", answers: bool = True) -> Path:
    """MMAU's layout: <folder>/<name>, a JSON list, and <folder>/test-mini-audios/<id>.wav; two records per task
    and one whose audio file is missing."""
    records = []
    for number, (task, difficulty) in enumerate([("sound", "easy"), ("sound", "hard"), ("music", "medium"),
                                                 ("music", "easy"), ("speech", "hard"), ("speech", "medium")]):
        record_id = f"5f0c{number:04d}-aaaa-4bbb-8ccc-{number:012d}"
        stand_in_audio(folder / "test-mini-audios" / f"{record_id}.wav", 300 + 150 * number)
        records.append({"id": record_id, "audio_id": f"./test-mini-audios/{record_id}.wav",
                        "question": "Which sound source is heard?", "choices": CHOICES,
                        "answer": CHOICES[number % 4], "dataset": "stand-in", "task": task, "split": "test-mini",
                        "category": "Reasoning" if number % 2 else "Perception",
                        "sub-category": ["Acoustic Source Inference", "Counting", "Event-Based Sound Reasoning"][
                            number % 3], "difficulty": difficulty})
    records.append({**records[0], "id": "gone", "audio_id": "./test-mini-audios/gone.wav"})
    if not answers:  # the test set: answers withheld
        records = [{key: value for key, value in record.items() if key != "answer"} for record in records]
    (folder / name).write_text(json.dumps(records, indent=4))
    return folder / name


def mmar_release(folder: Path) -> Path:
    """MMAR's layout: MMAR-meta.json beside audio/<id>.wav, here as JSON lines."""
    modalities = ["sound", "music", "speech", "sound-music", "sound-speech", "music-speech"]
    lines = []
    for number, modality in enumerate(modalities):
        record_id = f"{number}"
        stand_in_audio(folder / "audio" / f"{record_id}.wav", 500 + 100 * number)
        lines.append({"id": record_id, "audio_path": f"./audio/{record_id}.wav", "question": "What happens?",
                      "choices": CHOICES[:3], "answer": CHOICES[number % 3], "modality": modality,
                      "category": ["Signal Layer", "Semantic Layer"][number % 2], "sub-category": "Counting",
                      "language": "en", "source": "stand-in", "url": f"https://example.org/{number}",
                      "timestamp": "00:01-00:03"})
    (folder / "MMAR-meta.json").write_text("\n".join(json.dumps(line) for line in lines))
    return folder / "MMAR-meta.json"


def official_style_scores(records: list[dict], key: str, task: str, second: str) -> dict:
    """The breakdown the benchmarks' official scripts print, computed here from the submission file alone: a
    record without `key` is skipped; words are \\b\\w+\\b of the lower-cased text; right when every answer word is
    said and no word that only other choices have."""
    def words(text: str) -> set[str]:
        return set(re.findall(r"\b\w+\b", text.lower()))

    def right(record: dict) -> bool:
        said, answer = words(record[key]), words(record["answer"])
        wrong = set()
        for choice in record["choices"]:
            if words(choice) != answer:
                wrong |= words(choice) - answer
        return bool(said) and answer <= said and not (said & wrong)

    totals: dict[str, dict[str, list[int]]] = {"all": {}, task: {}, second: {}, "sub-category": {}}
    for record in records:
        if key not in record:
            continue
        for group, value in (("all", "all"), (task, record[task]), (second, record[second]),
                             ("sub-category", record["sub-category"])):
            counts = totals[group].setdefault(value, [0, 0])
            counts[0] += right(record)
            counts[1] += 1
    return {group: {value: round(100 * n / total, 2) for value, (n, total) in found.items()}
            for group, found in totals.items()}


def percent(block: dict) -> dict:
    return {value: round(100 * group["accuracy"], 2) for value, group in block.items()}


def test_the_answer_matching_rule():
    assert matches_choice("Dog barking", "dog barking", CHOICES)
    assert matches_choice("Dog barking", "The answer is (a) Dog barking.", CHOICES)  # shared 'dog' is no fault
    assert not matches_choice("Dog barking", "dog", CHOICES)  # not every word of the answer
    assert not matches_choice("Dog barking", "dog barking or growling", CHOICES)  # a word only another choice has
    assert not matches_choice("Dog barking", "", CHOICES) and not matches_choice("Dog barking", "!!", CHOICES)
    # an answer whose words another choice holds all of: the longer choice's own word decides
    pair = ["Man", "Old man"]
    assert matches_choice("Man", "a man", pair) and not matches_choice("Man", "old man", pair)
    assert matched_choice("dog growling", CHOICES) == "Dog growling"
    assert matched_choice("a bird", CHOICES) is None and matched_choice("dog", CHOICES) is None


def test_mmau_release_is_imported_as_published(tmp_path):
    release = mmau_release(tmp_path / "MMAU")
    output = invoke("prepare", "--source", f"mmau:{release}", "--root", tmp_path / "datasets")
    assert "gone.wav: audio file not found (needed by 1 row(s), e.g. mmau-test-mini.json record 7 (id gone))" in output
    assert "warning" not in output  # a benchmark has only a test split, and says nothing of train and val
    dataset = tmp_path / "datasets" / "mmau-test-mini"
    prepared = read_json(dataset / "prepare.json")
    assert prepared["benchmark"]["name"] == "mmau" and prepared["benchmark"]["records"] == 7
    assert prepared["benchmark"]["file_sha256"] == __import__("hashlib").sha256(release.read_bytes()).hexdigest()
    examples = read_jsonl(dataset / "test.jsonl")
    published = json.loads(release.read_text())
    assert [example["source"] for example in examples] == published[:6]  # every field, unchanged
    assert [example["position"] for example in examples] == list(range(6))
    first = examples[0]
    assert first["prompt"] == ("Which sound source is heard? a) Dog barking b) Dog growling c) Cat meowing "
                               "d) Silence")
    assert (first["task"], first["subtask"], first["answer"], first["options"]) == (
        "multiple_choice", "sound", "Dog barking", CHOICES)
    assert not (dataset / "train.jsonl").read_text().strip()

    # a revised release under the same path is another version: refused, not silently taken for the old one
    revised = json.loads(release.read_text())
    revised[0]["answer"] = "Silence"
    release.write_text(json.dumps(revised, indent=4))
    output = invoke("prepare", "--source", f"mmau:{release}", "--root", tmp_path / "datasets", code=2)
    assert "changed since" in output and "another version of the benchmark" in output and "--overwrite" in output


def test_mmar_release_in_json_lines_keeps_its_modalities(tmp_path):
    release = mmar_release(tmp_path / "MMAR")
    invoke("prepare", "--source", f"mmar:{release}", "--root", tmp_path / "datasets")
    dataset = tmp_path / "datasets" / "mmar"
    examples = read_jsonl(dataset / "test.jsonl")
    assert [example["subtask"] for example in examples] == ["sound", "music", "speech", "sound-music",
                                                              "sound-speech", "music-speech"]
    assert all(example["source"]["url"].startswith("https://") for example in examples)
    assert read_json(dataset / "prepare.json")["benchmark"]["name"] == "mmar"
    bad = tmp_path / "MMAR" / "broken.json"
    bad.write_text(json.dumps([{"id": "x", "audio_path": "./audio/0.wav", "question": "q", "choices": "abc"}]))
    output = invoke("prepare", "--source", f"mmar:{bad}", "--root", tmp_path / "datasets", code=2)
    assert "'choices' must be a list of at least two texts" in output
    output = invoke("prepare", "--source", f"mmar:{tmp_path / 'nowhere.json'}", "--root", tmp_path / "datasets",
                    code=2)
    assert "does not exist" in output and "MMAR-meta.json" in output
    output = invoke("prepare", "--source", f"mmar:{tmp_path / 'MMAR'}", "--root", tmp_path / "datasets", "--name",
                    "folder", code=2)
    assert "is a folder; pass the release's JSON file in it" in output


def _examples(release: Path, tmp_path: Path) -> tuple[list[dict], dict]:
    invoke("prepare", "--source", f"mmau:{release}", "--root", tmp_path / "datasets", "--name", release.stem)
    dataset = tmp_path / "datasets" / release.stem
    return read_jsonl(dataset / "test.jsonl"), read_json(dataset / "prepare.json")["benchmark"]


def test_scores_and_submission_file_of_known_answers(tmp_path):
    examples, info = _examples(mmau_release(tmp_path / "MMAU"), tmp_path)
    # answers: right, right despite the shared word 'dog', wrong (words of another choice), right, no choice, wrong
    predictions = ["Dog barking.", "dog growling", "cat meowing or silence", "the audio is silent: Silence",
                   "a bird", "dog barking"]
    block = benchmark_scores(info, examples, predictions)
    assert block["accuracy"] == pytest.approx(3 / 6) and block["scored"] == 6 and block["not_predicted"] == 1
    assert block["by_task"] == {"sound": {"accuracy": 1.0, "count": 2}, "music": {"accuracy": 0.5, "count": 2},
                                "speech": {"accuracy": 0.0, "count": 2}}
    assert block["by_difficulty"]["easy"] == {"accuracy": 1.0, "count": 2}
    assert block["no_match"] == pytest.approx(2 / 6)  # 'cat meowing or silence' names two; 'a bird' none
    path = write_submission(tmp_path, info, examples, predictions)
    submitted = json.loads(path.read_text())
    published = json.loads(Path(info["file"]).read_text())
    assert path.name == "mmau-predictions.json" and len(submitted) == len(published) == 7
    assert [{k: v for k, v in record.items() if k != "model_output"} for record in submitted] == published
    assert [record.get("model_output") for record in submitted] == [*predictions, None]
    assert "model_output" not in submitted[-1]  # no audio: not predicted, skipped by the official script too
    official = official_style_scores(submitted, "model_output", "task", "difficulty")
    assert official["all"]["all"] == 50.0 and official["task"] == percent(block["by_task"])
    assert official["difficulty"] == percent(block["by_difficulty"])
    assert official["sub-category"] == percent(block["by_sub_category"])


def test_a_test_set_without_answers_is_predicted_not_scored(tmp_path):
    examples, info = _examples(mmau_release(tmp_path / "MMAU", "mmau-test.json", answers=False), tmp_path)
    assert all(example["answer_withheld"] and example["answer"] == "" for example in examples)
    block = benchmark_scores(info, examples, ["dog"] * len(examples))
    assert block["accuracy"] is None and block["scored"] == 0 and block["withheld"] == 6
    assert "no record has an answer to score here" in benchmark_markdown(block)
    submitted = json.loads(write_submission(tmp_path, info, examples, ["dog"] * len(examples)).read_text())
    assert [record.get("model_output") for record in submitted] == ["dog"] * 6 + [None]


@pytest.fixture(scope="module")
def trained_elsewhere(mel_store, tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A run trained on the synthetic set's store, and the store root that holds that store."""
    root = tmp_path_factory.mktemp("benchmark") / "shards"
    store = root / tiny_dataset.name / mel_store.name
    shutil.copytree(mel_store, store)
    run_dir = root.parent / "run"
    loop.run(from_names(TrainConfig, store=store, dataset=tiny_dataset, run_dir=run_dir, max_updates=2,
                        batch_size=4, val_every=0), ModelConfig(**TINY_MODEL))
    return run_dir, root


def test_a_model_trained_elsewhere_is_scored_on_mmau_by_its_protocol(trained_elsewhere, tmp_path):
    run_dir, root = trained_elsewhere
    release = mmau_release(tmp_path / "MMAU")
    invoke("prepare", "--source", f"mmau:{release}", "--root", tmp_path / "datasets")
    dataset = tmp_path / "datasets" / "mmau-test-mini"

    output = invoke("eval", run_dir, "--dataset", dataset, "--similarity", "false", code=2)  # no store yet
    assert f"make one with: uv run stages/01_precompute.py {dataset} --like" in output
    undecodable = Path(read_jsonl(dataset / "audio.jsonl")[4]["path"])  # a file that is not audio at all
    undecodable.write_bytes(b"RIFF....WAVEfmt " + bytes(range(256)) * 4)
    output = invoke("prepare", "--source", f"mmau:{release}", "--root", tmp_path / "datasets")  # records the change
    output = invoke("precompute", dataset, "--like", run_dir, "--store-root", root, "--shard-clips", "4",
                    "--max-failures", "0.5")
    assert "encoder settings from --like" in output and "1 failed" in output
    store = next((root / "mmau-test-mini").iterdir())
    assert read_json(store / "meta.json")["fingerprint"] == read_json(
        run_dir / "step-000002" / "trainer.json")["store_fingerprint"]

    output = invoke("eval", run_dir, "--dataset", dataset, "--similarity", "false", "--max-new-tokens", "6")
    folder = run_dir / "step-000002" / "eval-mmau-test-mini-test"
    saved = read_json(folder / "scores.json")
    block = saved["benchmark"]
    assert block["name"] == "MMAU" and block["file_sha256"] == read_json(dataset / "prepare.json")["benchmark"][
        "file_sha256"]
    assert set(block) >= {"accuracy", "by_task", "by_difficulty", "by_sub_category", "no_match"}
    submitted = json.loads((folder / "mmau-predictions.json").read_text())
    official = official_style_scores(submitted, "model_output", "task", "difficulty")
    assert official["all"]["all"] == round(100 * block["accuracy"], 2)
    assert official["task"] == percent(block["by_task"])
    assert official["difficulty"] == percent(block["by_difficulty"])
    assert official["sub-category"] == percent(block["by_sub_category"])
    assert block["scored"] == 5 and block["not_predicted"] == 2  # the undecodable clip's and the missing file's
    assert [record["id"] for record in submitted] == [record["id"] for record in json.loads(release.read_text())]
    assert [index for index, record in enumerate(submitted) if "model_output" not in record] == [4, 6]
    predictions = read_jsonl(folder / "predictions.jsonl")
    assert [row["prediction"] for row in predictions] == [record["model_output"] for record in submitted
                                                          if "model_output" in record]
    assert saved["scores"]["multiple_choice"]["accuracy"] == pytest.approx(block["accuracy"])  # one rule
    report = (run_dir / "eval-mmau-test-mini-test" / "report.md").read_text()
    assert "## MMAU" in report and "| difficulty | n | accuracy |" in report and "mmau-predictions.json" in report
    page = (run_dir / "eval-mmau-test-mini-test" / "report.html").read_text()
    assert "<h2>MMAU</h2>" in page and "<th>sub-category</th>" in page
    assert "MMAU" in read_json(run_dir / "eval-mmau-test-mini-test" / "leaderboard.json")[0]
    assert "MMAU" in (folder / "summary.md").read_text()
    assert not (run_dir / "step-000002" / "eval-test").exists()  # the run's own evals are elsewhere

    ranked = invoke("eval", run_dir, "--dataset", dataset, "--closed", "rank", "--similarity", "false")
    assert "eval-mmau-test-mini-test-rank" in ranked
    block = read_json(run_dir / "step-000002" / "eval-mmau-test-mini-test-rank" / "scores.json")["benchmark"]
    assert block["no_match"] == 0.0  # a ranked answer is always one of the choices
    again = invoke("eval", run_dir, "--dataset", dataset, "--similarity", "false", "--max-new-tokens", "6")
    assert "1 already scored" in again


def test_a_store_made_otherwise_is_refused(trained_elsewhere, tmp_path):
    run_dir, root = trained_elsewhere
    invoke("prepare", "--source", f"mmar:{mmar_release(tmp_path / 'MMAR')}", "--root", tmp_path / "datasets")
    dataset = tmp_path / "datasets" / "mmar"
    output = invoke("precompute", dataset, "--like", run_dir, "--tokens", "8", "--store-root", tmp_path / "s",
                    code=2)
    assert "--encoder.tokens 8 (it has 4): contradicts --like" in output
    output = invoke("precompute", dataset, "--like", tmp_path, "--store-root", tmp_path / "s", code=2)
    assert "not a store (meta.json), a run or checkpoint folder" in output
    output = invoke("precompute", dataset, "--like", tmp_path / "typo", "--store-root", tmp_path / "s", code=2)
    assert "typo: no such folder" in output
    output = invoke("eval", run_dir, "--dataset", tmp_path / "datasets" / "mmar-typo", code=2)
    assert "mmar-typo: no audio.jsonl there" in output
    invoke("precompute", dataset, "--encoder", "mel", "--clip-seconds", "3", "--tokens", "8", "--store-root",
           tmp_path / "s")
    other = next((tmp_path / "s" / "mmar").iterdir())
    output = invoke("eval", run_dir, "--dataset", dataset, "--store", other, "--similarity", "false", code=2)
    assert "tokens: expected 4, found 8" in output
    output = invoke("eval", run_dir, "--dataset", dataset, "--similarity", "false", code=2)
    assert "no store of" in output and "--like" in output


def test_a_leaderboard_says_when_its_scores_come_from_different_release_versions():
    from mellow.evaluate.run_report import release_versions

    rows = [{"checkpoint": f"step-00000{n}", "benchmark": {"file_sha256": sha}} for n, sha in
            ((1, "a" * 64), (2, "a" * 64), (3, "b" * 64))]
    warning = release_versions(rows)
    assert "Not comparable" in warning and "2 versions" in warning and "step-000003" in warning
    assert release_versions(rows[:2]) == "" and release_versions([{"checkpoint": "step-1"}]) == ""
