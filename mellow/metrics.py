"""Scores as the field reports them: accuracy for closed questions, BLEU/ROUGE-L/CIDEr-D for free text.

Caption metrics use the coco-caption reference code (`pycocoevalcap`); its Java PTB tokenizer is replaced by
the same normalisation done in Python (lower-case, punctuation removed), so no Java is needed.
"""

from __future__ import annotations

import contextlib
import io
import re
import string
from collections import defaultdict

CLOSED_TASKS = ("yes_no", "comparison", "multiple_choice")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation, articles at the start and extra spaces: 'The first.' -> 'first'."""
    text = _PUNCTUATION.sub(" ", text.lower())
    words = text.split()
    while words and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


def option_letter(text: str) -> str | None:
    """The option letter of a multiple-choice answer: 'b) chirp' -> 'b', 'B' -> 'b'."""
    match = re.match(r"\s*\(?([a-dA-D])[\)\.:]?(\s|$)", text)
    return match.group(1).lower() if match else None


def chosen_option(example: dict, text: str) -> int | None:
    """Index of the option a multiple-choice answer names: by its text (the MMAU protocol), or by a bare
    letter ('b', 'b)'); a letter followed by an option's text counts as that text."""
    options = [normalize(option) for option in example["options"]]
    without_letter = normalize(re.sub(r"^\s*\(?[a-dA-D][\)\.:]\s+", "", text))
    for candidate in (normalize(text), without_letter):
        if candidate in options:
            return options.index(candidate)
    letter = option_letter(text)
    if letter is not None and without_letter in ("", letter) and "abcd".index(letter) < len(options):
        return "abcd".index(letter)
    return None


def is_correct(example: dict, prediction: str) -> bool:
    if example["task"] == "multiple_choice":
        expected = chosen_option(example, example["answer"])
        return expected is not None and chosen_option(example, prediction) == expected
    return normalize(prediction) == normalize(example["answer"])


def chance_level(example: dict) -> float:
    if example["task"] == "multiple_choice":
        return 1.0 / len(example["options"])
    return 0.5


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D of predictions against their reference lists."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hypotheses = {i: [normalize(p) or "empty"] for i, p in enumerate(predictions)}
    ground_truth = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its internals
        bleu, _ = Bleu(4).compute_score(ground_truth, hypotheses)
    rouge, _ = Rouge().compute_score(ground_truth, hypotheses)
    cider, _ = Cider().compute_score(ground_truth, hypotheses)
    return {"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3], "rouge_l": float(rouge),
            "cider_d": float(cider)}


def score(examples: list[dict], predictions: list[str]) -> dict[str, dict]:
    """Scores per task and per task/subtask: accuracy + chance for closed tasks, caption metrics otherwise."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[example["task"]].append(index)
        groups[f"{example['task']}/{example.get('subtask') or example['task']}"].append(index)
    results = {}
    for name, indices in sorted(groups.items()):
        task = name.split("/")[0]
        if task in CLOSED_TASKS:
            correct = sum(is_correct(examples[i], predictions[i]) for i in indices)
            chance = sum(chance_level(examples[i]) for i in indices) / len(indices)
            results[name] = {"count": len(indices), "accuracy": correct / len(indices), "chance": chance}
        else:
            references = [examples[i].get("references") or [examples[i]["answer"]] for i in indices]
            results[name] = {"count": len(indices), **caption_scores([predictions[i] for i in indices], references)}
    return results
