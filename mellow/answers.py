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
    """Whether a closed question's answer is right; `labels`: the label set of a closed-label task. A public
    benchmark's question (MMAU, MMAR) is judged by the benchmark's own rule (matches_choice)."""
    if example.get("benchmark"):
        return matches_choice(example["answer"], prediction, example["options"])
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



_WORD = re.compile(r"\b\w+\b")


def word_tokens(text: str) -> set[str]:
    """The distinct lower-cased word tokens of a text (runs of letters, digits and _, as Python's regex \\w reads
    them, in any script)."""
    return set(_WORD.findall(text.lower()))


def matches_choice(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's and MMAR's answer-matching rule, as their evaluation scripts apply it: a prediction is right when
    its word tokens hold every token of the answer and none of the tokens that another choice has and the answer
    has not; an empty prediction is wrong. 'The answer is (B) dog barking' is right for 'Dog barking' among
    'Dog barking' and 'Cat meowing'; 'dog or cat' is wrong."""
    said, expected = word_tokens(prediction), word_tokens(answer)
    if not said:
        return False
    others = set().union(*(word_tokens(choice) - expected for choice in choices if word_tokens(choice) != expected))
    return expected <= said and said.isdisjoint(others)


def matched_choice(prediction: str, choices: list[str]) -> str | None:
    """The first choice that `prediction` names by matches_choice, or None when it names none of them (a
    benchmark's "no match": an answer outside the choices, or one that names two)."""
    return next((choice for choice in choices if matches_choice(choice, prediction, choices)), None)
