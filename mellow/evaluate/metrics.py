"""Scores as the field reports them: accuracy for closed questions; BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE,
SPIDEr and a sentence-embedding similarity for free text.

Caption metrics are the coco-caption reference code (`pycocoevalcap`), run as its own evaluation script runs
them: captions tokenised by the Stanford PTB tokenizer (Java), then each scorer. What needs what:

    BLEU, ROUGE-L, CIDEr-D    Python. Without Java the PTB tokenizer is replaced by a Python one that splits
                              and drops punctuation the same way on plain English captions (a line says so).
    METEOR                    Java (its jar ships in pycocoevalcap)
    SPICE, SPIDEr             Java and Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib (its script downloads it)
    similarity                all-MiniLM-L6-v2 (bundled): cosine of prediction and each reference, averaged

A metric whose prerequisite is missing is left out of the scores, with one line saying what to install.

Closed-label tasks (an emotion, a sentiment, a sound kind: a dataset declares each task's labels in its
prepare.json, `"label_tasks": {"emotion": ["anger", ...]}`) map a prediction to a label by normalised text
("Joy." -> "joy"); anything else is an answer outside the label set, wrong and counted as such. They get the
figures emotion and sentiment papers report, over the labels that occur in the expected answers (as
scikit-learn does with `labels=` those labels; pinned to it in tests/test_metrics_pinned.py): accuracy,
unweighted average recall (UAR), macro-F1, weighted-F1 (MELD's usual figure), per-class precision, recall and
F1, the rate of answers outside the set, and a confusion table whose last column counts those answers. A clip
with several labels lists them all as `references`: naming any of them is right.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import string
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from mellow.answers import CLOSED_TASKS, OUTSIDE, expected_label, is_correct, normalize, predicted_label


def main_metric(values: dict) -> tuple[str, float]:
    """The score a task of `score`'s result is ranked by: accuracy for closed tasks, CIDEr-D for free text."""
    return ("accuracy", values["accuracy"]) if "accuracy" in values else ("cider_d", values["cider_d"])


def chance_level(example: dict) -> float:
    if example["task"] == "multiple_choice":
        return 1.0 / len(example["options"])
    return 0.5


def classification_scores(expected: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """Accuracy, UAR, macro- and weighted-F1, per-class precision/recall/F1/support, the rate of answers
    outside the label set, and the confusion table, over the labels that occur in `expected`."""
    assert expected and len(expected) == len(predicted)
    unknown = sorted(set(expected) - set(labels))
    if unknown:
        raise ValueError(f"expected answers {unknown[:5]} are not in the task's label set {labels}; fix the "
                         "examples or the label_tasks of the dataset's prepare.json")
    present = [label for label in labels if label in expected]
    per_class = {}
    for label in present:
        support = sum(answer == label for answer in expected)
        named = sum(answer == label for answer in predicted)
        hits = sum(e == label and p == label for e, p in zip(expected, predicted))
        precision = hits / named if named else 0.0
        recall = hits / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = len(expected)
    confusion = {label: {column: 0 for column in (*labels, OUTSIDE)} for label in present}
    for answer, prediction in zip(expected, predicted):
        confusion[answer][prediction if prediction is not None else OUTSIDE] += 1
    return {
        "accuracy": sum(e == p for e, p in zip(expected, predicted)) / total,
        "uar": sum(values["recall"] for values in per_class.values()) / len(present),
        "macro_f1": sum(values["f1"] for values in per_class.values()) / len(present),
        "weighted_f1": sum(values["f1"] * values["support"] for values in per_class.values()) / total,
        "outside_label_set": sum(prediction is None for prediction in predicted) / total,
        "chance": 1.0 / len(labels),
        "per_class": per_class,
        "confusion": confusion,
    }


def score_label_task(examples: list[dict], predictions: list[str], labels: list[str]) -> dict:
    """`classification_scores` of one closed-label task's examples and the model's answers."""
    predicted = [predicted_label(prediction, labels) for prediction in predictions]
    expected = [expected_label(example, label) for example, label in zip(examples, predicted)]
    return classification_scores(expected, predicted, labels)


PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}  # the tokens pycocoevalcap's PTBTokenizer drops


_PYTHON_TOKENS = re.compile(r"[a-z0-9]+(?:[-'./][a-z0-9]+)*|[^\sa-z0-9]")


def python_tokenize(text: str) -> str:
    """Lower-case, split off punctuation and drop it, as the PTB tokenizer + pycocoevalcap do for plain
    English captions (hyphenated words stay whole): 'A mid-pitched tone, then a click.' -> 'a mid-pitched tone
    then a click'."""
    tokens = _PYTHON_TOKENS.findall(text.lower().replace("\n", " "))
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION and token not in string.punctuation)


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """pycocoevalcap's PTBTokenizer.tokenize (Stanford's PTB tokenizer in Java, lower case, then its punctuation
    tokens dropped), with the sentences' file in a temporary folder: pycocoevalcap writes it into its own package
    folder, which a shared (read-only) environment does not allow."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    keys = [key for key, texts in captions.items() for _ in texts]
    sentences = "\n".join(text.replace("\n", " ") for texts in captions.values() for text in texts)
    with tempfile.TemporaryDirectory(prefix="mellow-ptb-") as folder:
        path = Path(folder) / "sentences.txt"
        path.write_bytes(sentences.encode())
        command = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", str(path)]
        with _quiet_stderr():  # the Java tokenizer reports its speed on stderr
            lines = subprocess.run(command, cwd=Path(ptbtokenizer.__file__).parent, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, check=True).stdout.decode().split("\n")
    tokenized: dict[int, list[str]] = {}
    for key, line in zip(keys, lines):
        tokenized.setdefault(key, []).append(" ".join(word for word in line.rstrip().split(" ")
                                                      if word not in ptbtokenizer.PUNCTUATIONS))
    return tokenized


def _package_dir() -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0])


def java_missing() -> str | None:
    """Why Java cannot run here, or None."""
    if shutil.which("java") is None:
        return "needs Java (e.g. apt-get install default-jre-headless)"
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"needs a working Java (`java -version` failed: {error})"
    return None


def corenlp_missing() -> str | None:
    """Why SPICE lacks the Stanford CoreNLP jars it needs besides Java, or None."""
    lib = _package_dir() / "spice" / "lib"
    jars = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    if not all(jar.is_file() for jar in jars):
        return (f"needs Stanford CoreNLP 3.6.0 ({jars[0].name} and {jars[1].name}) in {lib}: run "
                "`uv run python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'`"
                " where the Stanford NLP site can be reached, or copy the two jars there")
    return None


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None."""
    return corenlp_missing() or java_missing()


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what child processes write to stderr (file descriptor 2) inside the block."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CaptionScorer:
    """Every caption metric that can run here; `skipped` says which cannot, and why (one line each)."""

    def __init__(self, similarity: bool = True) -> None:
        self.java = java_missing()
        self.spice = corenlp_missing() or self.java  # spice_missing() without starting Java a second time
        self.skipped: dict[str, str] = {}
        if self.java:
            self.skipped["tokenizer"] = (f"captions tokenised in Python, not by the PTB tokenizer, which "
                                         f"{self.java}; BLEU/ROUGE-L/CIDEr-D may differ slightly from coco-caption's")
            self.skipped["meteor"] = f"METEOR skipped: it {self.java}"
        if self.spice:
            self.skipped["spice"] = f"SPICE and SPIDEr skipped: SPICE {self.spice}"
        self.similarity = similarity
        self._sentence_model = None
        self._meteor = None

    def _meteor_server(self):
        """METEOR's Java process, started on first use and kept for every later call: starting it (the JVM and
        METEOR's paraphrase tables) takes seconds, and 04_eval scores every task of every checkpoint. Each call
        is a self-contained EVAL of the statistics sent with it, so reusing it changes no score."""
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def close(self) -> None:
        """End the METEOR process, if one was started (a later call starts another)."""
        meteor, self._meteor = self._meteor, None
        del meteor  # its __del__ ends the Java process

    def tokenize(self, captions: dict[int, list[str]]) -> dict[int, list[str]]:
        if self.java:
            return {key: [python_tokenize(text) for text in texts] for key, texts in captions.items()}
        return ptb_tokenize(captions)

    def scores(self, predictions: list[str], references: list[list[str]],
               per_example: list[float] | None = None) -> dict[str, float]:
        """Corpus scores of `predictions` against their reference lists, as coco-caption computes them; each
        prediction's own CIDEr-D is appended to `per_example` if given."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        hypotheses = self.tokenize({i: [p] for i, p in enumerate(predictions)})
        hypotheses = {i: [text or "empty"] for i, (text,) in hypotheses.items()}  # scorers need a word
        ground_truth = self.tokenize(dict(enumerate(references)))
        with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its internals
            bleu, _ = Bleu(4).compute_score(ground_truth, hypotheses)
        results = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
        if not self.java:
            try:
                results["meteor"] = float(self._meteor_server().compute_score(ground_truth, hypotheses)[0])
            except Exception:
                self.close()  # a server that failed once is not trusted with the next call
                raise
        results["rouge_l"] = float(Rouge().compute_score(ground_truth, hypotheses)[0])
        cider, each = Cider().compute_score(ground_truth, hypotheses)
        results["cider_d"] = float(cider)
        if per_example is not None:
            per_example.extend(float(value) for value in each)
        if not self.spice:
            from pycocoevalcap.spice.spice import Spice

            with contextlib.redirect_stdout(io.StringIO()):
                results["spice"] = float(Spice().compute_score(ground_truth, hypotheses)[0])
            results["spider"] = (results["cider_d"] + results["spice"]) / 2
        if self.similarity:
            results["similarity"] = self.sentence_similarity(predictions, references)
        return results

    def sentence_similarity(self, predictions: list[str], references: list[list[str]]) -> float:
        """Mean over examples of the mean cosine similarity between the prediction and each reference, with
        all-MiniLM-L6-v2 embeddings (as aac-metrics' sbert_sim)."""
        if self._sentence_model is None:
            from mellow.encode.captions import TextEncoder
            from mellow.settings import TextEncoderConfig

            self._sentence_model = TextEncoder(TextEncoderConfig(device="cpu")).model
        flat = [text for texts in references for text in texts]
        distinct = list(dict.fromkeys([*predictions, *flat]))  # answers and references repeat: each encoded once
        vectors = self._sentence_model.encode(distinct, convert_to_numpy=True, normalize_embeddings=True,
                                              show_progress_bar=False, batch_size=128)  # (distinct, D) unit vectors
        row_of = {text: row for row, text in enumerate(distinct)}
        hypotheses = vectors[[row_of[text] for text in predictions]]  # (N, D)
        refs = vectors[[row_of[text] for text in flat]]  # (R, D)
        similarities, start = [], 0
        for hypothesis, texts in zip(hypotheses, references):
            similarities.append(float((refs[start : start + len(texts)] @ hypothesis).mean()))
            start += len(texts)
        return float(np.mean(similarities))


def score(examples: list[dict], predictions: list[str], scorer: CaptionScorer | None = None,
          label_tasks: dict[str, list[str]] | None = None,
          example_cider: dict[int, float] | None = None) -> dict[str, dict]:
    """Scores per task and per task/subtask: accuracy + chance for closed tasks (and a confusion table for
    binary ones), classification figures for the closed-label tasks in `label_tasks` ({task: labels}),
    caption metrics otherwise; `example_cider`, if given, gets each free-text example's own CIDEr-D (within
    its task)."""
    if scorer is None:  # a scorer made here ends its METEOR process here, as one passed in is ended by its owner
        with contextlib.closing(CaptionScorer()) as own:
            return score(examples, predictions, own, label_tasks, example_cider)
    label_tasks = label_tasks or {}
    computed: dict[tuple[int, ...], dict] = {}  # a task with one subtask is scored once
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[example["task"]].append(index)
        groups[f"{example['task']}/{example.get('subtask') or example['task']}"].append(index)
    results = {}
    for name, indices in sorted(groups.items()):
        task = name.split("/")[0]
        if task in label_tasks:
            results[name] = {"count": len(indices), **score_label_task(
                [examples[i] for i in indices], [predictions[i] for i in indices], label_tasks[task])}
        elif task in CLOSED_TASKS:
            correct = sum(is_correct(examples[i], predictions[i]) for i in indices)
            chance = sum(chance_level(examples[i]) for i in indices) / len(indices)
            results[name] = {"count": len(indices), "accuracy": correct / len(indices), "chance": chance}
            confusion = binary_confusion([examples[i] for i in indices], [predictions[i] for i in indices])
            if confusion:
                results[name]["confusion"] = confusion
        else:
            if tuple(indices) not in computed:
                references = [examples[i].get("references") or [examples[i]["answer"]] for i in indices]
                each: list[float] = []
                computed[tuple(indices)] = scorer.scores([predictions[i] for i in indices], references, each)
                if example_cider is not None and name == task:  # the task's, not a subtask's, document counts
                    example_cider.update(zip(indices, each))
            results[name] = {"count": len(indices), **computed[tuple(indices)]}
    return results


def binary_confusion(examples: list[dict], predictions: list[str]) -> dict[str, dict[str, int]] | None:
    """For a task whose expected answers take two values (yes/no, first/second): counts of
    {expected: {predicted: n}}, predictions that are neither value counted as "other". None otherwise."""
    expected = [normalize(example["answer"]) for example in examples]
    values = sorted(set(expected))
    if len(values) != 2 or any(example["task"] == "multiple_choice" for example in examples):
        return None
    table = {value: {column: 0 for column in (*values, "other")} for value in values}
    for answer, prediction in zip(expected, predictions):
        predicted = normalize(prediction)
        table[answer][predicted if predicted in values else "other"] += 1
    return table

