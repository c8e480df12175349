"""The synthetic set: deterministic, split cleanly, and its answers agree with the ground truth."""

from __future__ import annotations

import math

from mellow.files import read_jsonl
from mellow.sources import synth

SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}


def test_same_seed_same_data_and_different_seed_different_data():
    first = synth.generate(60, 7, 6.0, SPLITS)[1]
    assert first == synth.generate(60, 7, 6.0, SPLITS)[1]
    assert first != synth.generate(60, 8, 6.0, SPLITS)[1]


def test_splits_share_no_clip_and_pairs_stay_inside_a_split():
    scenes, examples, clip_split = synth.generate(120, 1, 6.0, SPLITS)
    assert sorted(clip_split) == sorted(scene.id for scene in scenes)
    for split, rows in examples.items():
        for row in rows:
            assert row["split"] == split
            assert clip_split[row["audio1"]] == split
            assert row["audio2"] is None or clip_split[row["audio2"]] == split


def test_every_task_appears_and_answers_match_ground_truth():
    scenes, examples, _ = synth.generate(200, 2, 6.0, SPLITS)
    by_id = {scene.id: scene for scene in scenes}
    rows = [row for split in examples.values() for row in split]
    assert {row["task"] for row in rows} == {"caption", "yes_no", "multiple_choice", "comparison", "difference",
                                             "sound_kind"}
    for row in rows:
        first, second = by_id[row["audio1"]], by_id.get(row["audio2"])
        if row["subtask"] == "louder":
            assert (row["answer"] == "first") == (first.loudest_db > second.loudest_db)
        elif row["subtask"] == "longer":
            assert (row["answer"] == "first") == (first.duration > second.duration)
        elif row["subtask"] == "higher":
            assert (row["answer"] == "first") == (first.pitch_hz > second.pitch_hz)
            assert abs(math.log(first.pitch_hz / second.pitch_hz)) >= math.log(synth.MIN_PITCH_RATIO)
        elif row["subtask"] == "silence":
            assert (row["answer"] == "yes") == (not first.events)
        elif row["subtask"] == "count":
            assert row["answer"] == synth.NUMBER_WORDS[len(first.events)] and row["answer"] in row["options"]
            assert f") {row['answer']}" in row["prompt"]
        elif row["task"] == "caption":
            assert len(row["references"]) >= 2 and row["answer"] == row["references"][0]
        elif row["task"] == "sound_kind":
            assert len(first.events) <= 1 and row["answer"] == (first.events[0].kind if first.events else "silence")
    kinds = {row["answer"] for row in rows if row["task"] == "sound_kind"}
    assert kinds == set(synth.LABEL_TASKS["sound_kind"])  # every label of the closed-label task occurs


def test_binary_answers_are_balanced():
    _, examples, _ = synth.generate(400, 4, 6.0, SPLITS)
    for subtask in ("presence", "silence", "louder", "longer"):
        answers = [row["answer"] for row in examples["train"] if row["subtask"] == subtask]
        share = max(answers.count(a) for a in set(answers)) / len(answers)
        assert share < 0.65, (subtask, share)


def test_prepared_folder_has_mixed_real_audio(tiny_dataset):
    records = read_jsonl(tiny_dataset / "audio.jsonl")
    assert len(records) == 24
    assert len({r["path"].rsplit(".", 1)[1] for r in records}) >= 3
    assert len({r["sample_rate"] for r in records}) >= 2
    for record in records:
        assert (tiny_dataset / record["path"]).stat().st_size > 0
    for split in ("train", "val", "test"):
        assert read_jsonl(tiny_dataset / f"{split}.jsonl")
