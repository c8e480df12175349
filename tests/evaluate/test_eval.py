"""Scoring: metric behaviour on known inputs, and the eval stage's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mellow import answers
from mellow.config import from_names
from mellow.evaluate import metrics, score
from mellow.files import read_json, read_jsonl
from mellow.settings import EvalConfig, ModelConfig, TrainConfig
from mellow.store.writer import StoreMismatchError
from mellow.train import loop

from conftest import TINY_MODEL


def test_normalisation_and_option_letters():
    assert answers.normalize("The First.") == "first"
    assert answers.option_letter("b) noise burst") == "b"
    assert answers.option_letter("(C)") == "c"
    assert answers.option_letter("banana") is None


def test_multiple_choice_answers_are_matched_by_option_text_or_bare_letter():
    example = {"task": "multiple_choice", "answer": "noise burst", "options": ["tone", "noise burst", "chirp"]}
    assert answers.is_correct(example, "Noise burst.")
    assert answers.is_correct(example, "b)")
    assert answers.is_correct(example, "b) noise burst")
    assert not answers.is_correct(example, "a) tone")
    assert not answers.is_correct(example, "a")
    assert not answers.is_correct(example, "a loud noise burst and a tone")
    lettered = {**example, "answer": "b) noise burst"}  # answers written with their letter work the same
    assert answers.is_correct(lettered, "noise burst") and not answers.is_correct(lettered, "c")


def test_scores_are_exact_on_perfect_and_wrong_answers():
    examples = [
        {"task": "yes_no", "subtask": "silence", "answer": "yes"},
        {"task": "yes_no", "subtask": "silence", "answer": "no"},
        {"task": "multiple_choice", "subtask": "count", "answer": "c) three", "options": ["one", "two", "three"]},
        {"task": "caption", "subtask": "caption", "answer": "a loud tone", "references": ["a loud tone",
                                                                                       "a strong beep"]},
    ]
    scorer = metrics.CaptionScorer(similarity=False)  # one scorer (one METEOR process) for both
    perfect = metrics.score(examples, ["Yes.", "no", "c) three", "a loud tone"], scorer)
    assert perfect["yes_no"] == {"count": 2, "accuracy": 1.0, "chance": 0.5,
                                 "confusion": {"no": {"no": 1, "yes": 0, "other": 0},
                                               "yes": {"no": 0, "yes": 1, "other": 0}}}
    assert perfect["multiple_choice"]["accuracy"] == 1.0
    assert perfect["multiple_choice"]["chance"] == pytest.approx(1 / 3)
    assert perfect["caption"]["rouge_l"] == pytest.approx(1.0)
    wrong = metrics.score(examples, ["no", "yes", "a) one", "silence"], scorer)
    scorer.close()
    assert wrong["yes_no"]["accuracy"] == 0.0 and wrong["multiple_choice"]["accuracy"] == 0.0
    assert wrong["caption"]["bleu_4"] < 1e-6 and wrong["caption"]["rouge_l"] == 0.0


def test_eval_stage_writes_predictions_scores_and_summary(mel_store, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=3,
                        batch_size=4,
                          val_every=0, save_every=3), ModelConfig(**TINY_MODEL))
    result = score.run(EvalConfig(run=run_dir, split="test", max_new_tokens=8, batch_size=7))
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
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=1,
                        batch_size=4,
                          val_every=0), ModelConfig(**TINY_MODEL))
    other = tmp_path / "other-store"
    shutil.copytree(mel_store, other)
    meta = read_json(other / "meta.json")
    meta["fingerprint"]["tokens"] = 99
    (other / "meta.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(StoreMismatchError, match="tokens: expected 4, found 99"):
        score.run(EvalConfig(run=run_dir, store=other))


@pytest.fixture(scope="module")
def three_checkpoints(mel_store, tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=6,
                        batch_size=4,
                          val_every=0, save_every=2, keep_last=3), ModelConfig(**TINY_MODEL))
    return run_dir


def test_eval_scores_every_checkpoint_once_then_writes_leaderboard_and_report(three_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    settings = dict(run=run_dir, max_new_tokens=4, max_examples=12, similarity=False)
    result = score.run(EvalConfig(**settings))
    assert [p.name for p in result.scored] == ["step-000002", "step-000004", "step-000006"]
    for checkpoint in result.scored:
        saved = read_json(checkpoint / "eval-test" / "scores.json")
        assert saved["settings"]["max_examples"] == 12 and saved["update"] == int(checkpoint.name[-6:])
        assert len(read_jsonl(checkpoint / "eval-test" / "predictions.jsonl")) == 12
    out = run_dir / "eval-test"
    leaderboard = read_json(out / "leaderboard.json")
    assert [row["update"] for row in leaderboard] == [2, 4, 6]
    newest = read_json(run_dir / "step-000006" / "eval-test" / "scores.json")["scores"]
    assert leaderboard[-1]["yes_no"] == newest["yes_no"]["accuracy"]
    report = (out / "report.md").read_text()
    assert "![scores.png](scores.png)" in report and "![loss.png](loss.png)" in report
    assert "| step-000006 (latest) | 6 |" in report and "expected \\ predicted" in report
    for png in ("scores.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000

    # resumable: a second run scores nothing; one checkpoint whose scores are gone is the only one redone
    stamp = (run_dir / "step-000002" / "eval-test" / "predictions.jsonl").stat().st_mtime_ns
    (run_dir / "step-000004" / "eval-test" / "scores.json").unlink()
    again = score.run(EvalConfig(**settings))
    assert [p.name for p in again.scored] == ["step-000004"] and len(again.already_scored) == 2
    assert (run_dir / "step-000002" / "eval-test" / "predictions.jsonl").stat().st_mtime_ns == stamp
    other = score.run(EvalConfig(**{**settings, "max_examples": 6}))  # other settings: scored again
    assert len(other.scored) == 3


def test_a_broken_checkpoint_is_reported_and_the_others_are_scored(three_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    weights = run_dir / "step-000004" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(score.EvalFailures, match=r"1 of 3 checkpoint\(s\) could not be scored: step-000004: "
                                                    r"ValueError: .*step-000004 cannot be loaded .*damaged"):
        score.run(EvalConfig(run=run_dir, max_new_tokens=4, max_examples=6, similarity=False))
    assert (run_dir / "step-000002" / "eval-test" / "scores.json").exists()
    assert (run_dir / "step-000006" / "eval-test" / "scores.json").exists()
    assert not (run_dir / "step-000004" / "eval-test").exists()
    assert "step-000004 could not be scored" in (run_dir / "eval-test" / "report.md").read_text()
    with pytest.raises(ValueError, match="step-000004 cannot be loaded"):  # named alone, it is an error
        score.run(EvalConfig(run=run_dir / "step-000004", max_new_tokens=4, similarity=False))


def test_eval_bad_inputs_get_clear_messages(three_checkpoints, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"split 'nope' not found .* available: \['test', 'train', 'val'\]"):
        score.run(EvalConfig(run=three_checkpoints, which="latest", split="nope", similarity=False))
    with pytest.raises(ValueError, match="--which 'every' must be all, latest or best"):
        EvalConfig(run=three_checkpoints, which="every")
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        score.run(EvalConfig(run=tmp_path, similarity=False))
    moved = tmp_path / "moved"  # a run whose store was recorded as a path that is not found from here
    shutil.copytree(three_checkpoints / "step-000006", moved)
    trainer = read_json(moved / "trainer.json")
    (moved / "trainer.json").write_text(json.dumps({**trainer, "store": "shards/elsewhere/store"}))
    with pytest.raises(FileNotFoundError, match=r"trained with --store shards/elsewhere/store, which is not found "
                                                r"from .*; pass --store <where it is now>"):
        score.run(EvalConfig(run=moved, similarity=False))
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    monkeypatch.setattr(score, "generate_all", lambda model, tokenizer, examples, config, device, indices:
                        ["" if i % 2 else "yes" for i in range(len(examples))])
    result = score.run(EvalConfig(run=run_dir, which="latest", max_examples=6, similarity=False))
    assert "3 of 6 predictions are empty" in capsys.readouterr().out.replace("\n", " ")
    assert read_json(result.output_dir / "scores.json")["empty_predictions"] == 3


def test_a_closed_label_task_gets_classification_figures_and_a_confusion_matrix(three_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    score.run(EvalConfig(run=run_dir, which="latest", max_new_tokens=8, similarity=False))
    scores = read_json(run_dir / "step-000006" / "eval-test" / "scores.json")["scores"]["sound_kind"]
    assert {"accuracy", "uar", "macro_f1", "weighted_f1", "outside_label_set", "per_class", "confusion"} <= set(scores)
    assert scores["chance"] == pytest.approx(1 / 6)
    report = (run_dir / "eval-test" / "report.md").read_text()
    assert "## Closed-label tasks" in report and "![confusion-sound_kind.png](confusion-sound_kind.png)" in report
    png = run_dir / "eval-test" / "confusion-sound_kind.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 3000


def test_rank_mode_answers_every_closed_question_inside_its_set_by_log_likelihood(three_checkpoints, tmp_path,
                                                                                   monkeypatch):
    import torch

    from mellow.store.reader import EmbeddingStore
    from mellow.train.checkpoint import load_trained_model
    from mellow.train.data import ExampleSet, RowsFromZarr, move_to

    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    generated = []  # the examples that went through generation: the free-text ones alone
    generate_all = score.generate_all
    monkeypatch.setattr(score, "generate_all", lambda *args: generated.extend(args[-1]) or generate_all(*args))
    result = score.run(EvalConfig(run=run_dir, which="latest", max_new_tokens=8, similarity=False,
                                     closed="rank"))
    assert result.output_dir == run_dir / "step-000006" / "eval-test-rank"
    saved = read_json(result.output_dir / "scores.json")
    assert saved["settings"]["closed"] == "rank" and saved["examples_per_s"] > 0
    assert saved["scores"]["sound_kind"]["outside_label_set"] == 0.0
    dataset = Path(read_json(run_dir / "step-000006" / "trainer.json")["config"]["train"]["dataset"])
    label_tasks = read_json(dataset / "prepare.json")["label_tasks"]
    rows = read_jsonl(result.output_dir / "predictions.jsonl")
    closed = [row for row in rows if score.closed_options(row, label_tasks)]
    assert closed and all(row["prediction"] in score.closed_options(row, label_tasks) for row in closed)
    assert sorted(generated) == [i for i, row in enumerate(rows) if not score.closed_options(row, label_tasks)]
    assert {rows[i]["task"] for i in generated} == {"caption", "difference"}
    assert (run_dir / "eval-test-rank" / "leaderboard.json").exists()

    # the chosen answer is the one whose tokens the model finds most likely, computed here from the logits
    model, tokenizer, _ = load_trained_model(run_dir / "step-000006", torch.device("cpu"))
    store = EmbeddingStore(Path(read_json(run_dir / "step-000006" / "trainer.json")["store"]))
    row = next(row for row in closed if row["task"] == "sound_kind")
    options = score.closed_options(row, label_tasks)
    pairs = ExampleSet([{**row, "answer": option} for option in options], store, tokenizer, 256,
                       rows=RowsFromZarr(store), prompt_suffix=model.prompt_suffix)
    by_hand = []
    for index in range(len(options)):
        batch = move_to(pairs.batch([index]), torch.device("cpu"))
        embeds, mask, positions, _ = model.build_inputs(batch)
        with torch.no_grad():
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        answer = pairs.answer_ids(index)
        start = embeds.shape[1] - len(answer)  # the answer (+EOS) ends the sequence: no padding in a batch of one
        log_probs = torch.log_softmax(logits[0, start - 1 : -1].float(), dim=-1)
        by_hand.append(float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum()))
    assert row["prediction"] == options[by_hand.index(max(by_hand))]
    ranked = model.answer_log_likelihood(move_to(pairs.batch(list(range(len(options)))), torch.device("cpu")))
    assert ranked.tolist() == pytest.approx(by_hand, abs=1e-4)
