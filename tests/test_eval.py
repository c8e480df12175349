"""Scoring: metric behaviour on known inputs, and the eval stage's outputs."""

from __future__ import annotations

import pytest
from conftest import TINY_MODEL

from mellow import evaluate, metrics, train
from mellow.evaluate import EvalConfig
from mellow.files import read_json, read_jsonl
from mellow.model import ModelConfig
from mellow.store import StoreMismatchError
from mellow.train import TrainConfig


def test_normalisation_and_option_letters():
    assert metrics.normalize("The First.") == "first"
    assert metrics.option_letter("b) noise burst") == "b"
    assert metrics.option_letter("(C)") == "c"
    assert metrics.option_letter("banana") is None


def test_multiple_choice_answers_are_matched_by_option_text_or_bare_letter():
    example = {"task": "multiple_choice", "answer": "noise burst", "options": ["tone", "noise burst", "chirp"]}
    assert metrics.is_correct(example, "Noise burst.")
    assert metrics.is_correct(example, "b)")
    assert metrics.is_correct(example, "b) noise burst")
    assert not metrics.is_correct(example, "a) tone")
    assert not metrics.is_correct(example, "a")
    assert not metrics.is_correct(example, "a loud noise burst and a tone")
    lettered = {**example, "answer": "b) noise burst"}  # answers written with their letter work the same
    assert metrics.is_correct(lettered, "noise burst") and not metrics.is_correct(lettered, "c")


def test_scores_are_exact_on_perfect_and_wrong_answers():
    examples = [
        {"task": "yes_no", "subtask": "silence", "answer": "yes"},
        {"task": "yes_no", "subtask": "silence", "answer": "no"},
        {"task": "multiple_choice", "subtask": "count", "answer": "c) three", "options": ["one", "two", "three"]},
        {"task": "caption", "subtask": "caption", "answer": "a loud tone", "references": ["a loud tone",
                                                                                       "a strong beep"]},
    ]
    perfect = metrics.score(examples, ["Yes.", "no", "c) three", "a loud tone"])
    assert perfect["yes_no"] == {"count": 2, "accuracy": 1.0, "chance": 0.5}
    assert perfect["multiple_choice"]["accuracy"] == 1.0
    assert perfect["multiple_choice"]["chance"] == pytest.approx(1 / 3)
    assert perfect["caption"]["rouge_l"] == pytest.approx(1.0)
    wrong = metrics.score(examples, ["no", "yes", "a) one", "silence"])
    assert wrong["yes_no"]["accuracy"] == 0.0 and wrong["multiple_choice"]["accuracy"] == 0.0
    assert wrong["caption"]["bleu_4"] < 1e-6 and wrong["caption"]["rouge_l"] == 0.0


def test_eval_stage_writes_predictions_scores_and_summary(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    train.run(TrainConfig(store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=3, batch_size=4,
                          val_every=0, save_every=3), ModelConfig(**TINY_MODEL))
    result = evaluate.run(EvalConfig(run=run_dir, split="test", max_new_tokens=8, batch_size=7))
    assert result.output_dir == run_dir / "step-000003" / "eval-test"
    predictions = read_jsonl(result.output_dir / "predictions.jsonl")
    examples = read_jsonl(tiny_dataset / "test.jsonl")
    assert len(predictions) == len(examples) == result.examples
    assert [p["prompt"] for p in predictions] == [e["prompt"] for e in examples]
    assert all(isinstance(p["prediction"], str) for p in predictions)
    scores = read_json(result.output_dir / "scores.json")["scores"]
    assert {"caption", "yes_no"} <= set(scores)
    assert scores["yes_no"]["chance"] == 0.5
    assert "| yes_no |" in (result.output_dir / "summary.md").read_text()


def test_eval_refuses_a_store_with_another_fingerprint(mel_store, tiny_dataset, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    train.run(TrainConfig(store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=1, batch_size=4,
                          val_every=0), ModelConfig(**TINY_MODEL))
    other = tmp_path / "other-store"
    shutil.copytree(mel_store, other)
    meta = read_json(other / "meta.json")
    meta["fingerprint"]["tokens"] = 99
    (other / "meta.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(StoreMismatchError, match="tokens: expected 4, found 99"):
        evaluate.run(EvalConfig(run=run_dir, store=other))
