"""How a closed answer is read and judged (yes/no, comparison, multiple choice, closed-label tasks): one rule
shared by 03_train's validation accuracy and 04_eval's scores."""

from __future__ import annotations

import re
import string

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


def is_correct(example: dict, prediction: str, labels: list[str] | None = None) -> bool:
    """Whether a closed question's answer is right; `labels`: the label set of a closed-label task."""
    if labels is not None:
        return is_label_correct(example, prediction, labels)
    if example["task"] == "multiple_choice":
        expected = chosen_option(example, example["answer"])
        return expected is not None and chosen_option(example, prediction) == expected
    return normalize(prediction) == normalize(example["answer"])


OUTSIDE = "(outside the set)"


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label a prediction names (case, punctuation and a leading article do not matter), or None."""
    by_text = {normalize(label): label for label in labels}
    return by_text.get(normalize(prediction))


def expected_label(example: dict, predicted: str | None) -> str:
    """The example's label; for a clip with several, the one the prediction names if it names one of them."""
    references = example.get("references") or [example["answer"]]
    return predicted if predicted in references else example["answer"]


def is_label_correct(example: dict, prediction: str, labels: list[str]) -> bool:
    label = predicted_label(prediction, labels)
    return label is not None and label in (example.get("references") or [example["answer"]])

