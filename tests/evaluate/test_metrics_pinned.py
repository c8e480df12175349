"""Every metric pinned, on a fixed set of predictions and references, to the value the reference implementation
gives (1e-6): a change of tokenisation, of a scorer's settings or of how the metrics are wired shows up here.

The caption values were computed once with pycocoevalcap's own pipeline as its eval.py runs it (the Stanford
PTB tokenizer in Java, then Bleu(4), Meteor, Rouge, Cider), and the similarity with sentence-transformers'
`util.cos_sim` on all-MiniLM-L6-v2 embeddings, averaged over references, then examples (aac-metrics' sbert_sim).
"""

from __future__ import annotations

import pytest

from mellow import answers
from mellow.evaluate import metrics

PREDICTIONS = [
    "A mid-pitched tone, then a falling chirp.",
    "a loud noise burst followed by clicks",
    "Two high beeps and a low hum.",
    "a quiet series of clicks and pops",
]
REFERENCES = [
    ["a moderate mid-pitched tone followed by a falling chirp", "a steady tone and then a chirp that falls.",
     "A mid-pitched beep, then a falling chirp!"],
    ["a loud burst of noise followed by a series of clicks", "loud static, then ticking"],
    ["two high-pitched beeps followed by a low hum", "a pair of high beeps and a deep humming sound",
     "high beeps twice, then a low drone"],
    ["a soft series of clicks", "quiet ticking sounds", "a faint clicking"],
]
REFERENCE_VALUES = {  # pycocoevalcap 1.2 (PTBTokenizer, Java 17) and sentence-transformers, see the docstring
    "bleu_1": 0.9285714285382654, "bleu_2": 0.7359800721655119, "bleu_3": 0.5456964415073825,
    "bleu_4": 0.37752076515585364, "meteor": 0.38177583528736325, "rouge_l": 0.7110487091431188,
    "cider_d": 2.084616164026202, "similarity": 0.7993969023227692,
}
PYTHON_TOKENIZER_VALUES = {  # the same scorers on the Python tokenizer's output (where no Java is found)
    "bleu_1": 0.9285714285382654, "bleu_2": 0.7359800721655119, "bleu_3": 0.5456964415073825,
    "bleu_4": 0.37752076515585364, "rouge_l": 0.7110487091431188, "cider_d": 2.084616164026202,
}
needs_java = pytest.mark.skipif(metrics.java_missing() is not None, reason=f"the reference pipeline "
                                f"{metrics.java_missing()}")


@needs_java
def test_caption_metrics_equal_the_reference_pipeline(monkeypatch):
    from pycocoevalcap.meteor import meteor

    started = []
    monkeypatch.setattr(meteor.Meteor, "__init__", lambda self, init=meteor.Meteor.__init__: started.append(1)
                        or init(self))
    scorer = metrics.CaptionScorer()
    scores = scorer.scores(PREDICTIONS, REFERENCES)
    for name, expected in REFERENCE_VALUES.items():
        assert scores[name] == pytest.approx(expected, abs=1e-6), name
    assert ("spice" in scores) == (metrics.spice_missing() is None)
    # the METEOR process is kept between calls (eval scores every task of every checkpoint): the same scores
    assert scorer.scores(PREDICTIONS[2:], REFERENCES[2:])["meteor"] != scores["meteor"]
    assert scorer.scores(PREDICTIONS, REFERENCES) == scores
    assert len(started) == 1
    process = scorer._meteor.meteor_p
    scorer.close()
    assert process.wait(timeout=30) is not None and scorer._meteor is None


def test_python_tokenizer_matches_the_ptb_tokenizer_on_plain_captions(monkeypatch):
    tokens = metrics.python_tokenize("A mid-pitched tone, then a falling chirp.")
    assert tokens == "a mid-pitched tone then a falling chirp"
    assert metrics.python_tokenize("High beeps twice; then a LOW drone!") == "high beeps twice then a low drone"
    monkeypatch.setattr(metrics, "java_missing", lambda: "needs Java (e.g. apt-get install default-jre-headless)")
    scorer = metrics.CaptionScorer()
    scores = scorer.scores(PREDICTIONS, REFERENCES)
    assert "meteor" not in scores and "spice" not in scores and "spider" not in scores
    assert scorer.skipped["meteor"] == ("METEOR skipped: it needs Java (e.g. apt-get install "
                                        "default-jre-headless)")
    for name, expected in PYTHON_TOKENIZER_VALUES.items():
        assert scores[name] == pytest.approx(expected, abs=1e-6), name
    if metrics.java_missing() is None:  # the Python tokenizer gives the reference's tokens on these captions
        for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"):
            assert PYTHON_TOKENIZER_VALUES[name] == pytest.approx(REFERENCE_VALUES[name], abs=1e-9), name


def test_spice_without_corenlp_is_skipped_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_package_dir", lambda: tmp_path)
    reason = metrics.spice_missing()
    assert "stanford-corenlp-3.6.0.jar" in reason and str(tmp_path / "spice" / "lib") in reason
    scorer = metrics.CaptionScorer(similarity=False)
    assert scorer.skipped["spice"].startswith("SPICE and SPIDEr skipped: SPICE needs Stanford CoreNLP 3.6.0")
    scores = scorer.scores(PREDICTIONS[:1], REFERENCES[:1])
    assert "spice" not in scores and "spider" not in scores and "cider_d" in scores


QA_EXAMPLES = [
    {"task": "yes_no", "answer": "yes"}, {"task": "yes_no", "answer": "no"}, {"task": "yes_no", "answer": "no"},
    {"task": "yes_no", "answer": "yes"}, {"task": "yes_no", "answer": "yes"},
    {"task": "comparison", "answer": "the first"}, {"task": "comparison", "answer": "the second"},
    {"task": "multiple_choice", "answer": "b) noise burst", "options": ["tone", "noise burst", "chirp", "clicks"]},
    {"task": "multiple_choice", "answer": "chirp", "options": ["tone", "noise burst", "chirp"]},
    {"task": "multiple_choice", "answer": "a", "options": ["hum", "beep"]},
]
QA_PREDICTIONS = ["Yes.", "no", "yes", "maybe", "YES", "First", "the first one", "B", "c) Chirp.", "beep"]


def test_closed_task_scores_are_pinned():
    scores = metrics.score(QA_EXAMPLES, QA_PREDICTIONS, metrics.CaptionScorer(similarity=False))
    # yes/no: 'Yes.', 'no', 'YES' match after normalisation; 'yes' for no and 'maybe' do not -> 3/5
    assert scores["yes_no"]["accuracy"] == pytest.approx(3 / 5, abs=1e-6) and scores["yes_no"]["chance"] == 0.5
    assert scores["yes_no"]["confusion"] == {"no": {"no": 1, "yes": 1, "other": 0},
                                             "yes": {"no": 0, "yes": 2, "other": 1}}
    # comparison: 'First' = 'the first'; 'the first one' is not 'the second' -> 1/2
    assert scores["comparison"]["accuracy"] == pytest.approx(1 / 2, abs=1e-6)
    assert scores["comparison"]["confusion"]["second"] == {"first": 0, "second": 0, "other": 1}
    # multiple choice: by letter 'B' -> noise burst (right); by letter + text 'c) Chirp.' (right); by text
    # 'beep' for the expected letter 'a' = hum (wrong) -> 2/3; chance (1/4 + 1/3 + 1/2) / 3
    assert scores["multiple_choice"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["multiple_choice"]["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3, abs=1e-6)
    assert "confusion" not in scores["multiple_choice"]


EMOTIONS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
# (expected, answer as generated): a skewed set, a class never predicted, answers outside the set, and a label
# ("surprise") that no example expects, which the figures leave out as scikit-learn does with labels=present
LABELLED = [("neutral", "neutral"), ("neutral", "Neutral."), ("neutral", "joy"), ("neutral", "neutral"),
            ("joy", "joy"), ("joy", "the joy"), ("joy", "happiness"), ("anger", "anger"), ("anger", "disgust"),
            ("sadness", "neutral"), ("sadness", "sadness"), ("fear", "I am not sure"), ("disgust", "anger"),
            ("neutral", "sadness"), ("joy", "neutral")]


def test_closed_label_figures_equal_scikit_learns():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    examples = [{"task": "emotion", "answer": expected} for expected, _ in LABELLED]
    predictions = [answer for _, answer in LABELLED]
    scores = metrics.score(examples, predictions, label_tasks={"emotion": EMOTIONS})["emotion"]

    truth = [expected for expected, _ in LABELLED]
    named = [answers.predicted_label(answer, EMOTIONS) or "<outside>" for answer in predictions]
    present = [label for label in EMOTIONS if label in truth]
    assert "surprise" not in present and named.count("<outside>") == 2
    assert scores["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truth, named), abs=1e-12)
    assert scores["uar"] == pytest.approx(
        sklearn_metrics.recall_score(truth, named, labels=present, average="macro", zero_division=0), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(truth, named, labels=present, average="macro", zero_division=0), abs=1e-12)
    assert scores["weighted_f1"] == pytest.approx(
        sklearn_metrics.f1_score(truth, named, labels=present, average="weighted", zero_division=0), abs=1e-12)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        truth, named, labels=present, zero_division=0)
    for index, label in enumerate(present):
        assert scores["per_class"][label] == pytest.approx(
            {"precision": precision[index], "recall": recall[index], "f1": f1[index], "support": support[index]})
    matrix = sklearn_metrics.confusion_matrix(truth, named, labels=[*EMOTIONS, "<outside>"])
    for index, label in enumerate(present):
        assert list(scores["confusion"][label].values()) == list(matrix[EMOTIONS.index(label)])
    assert scores["outside_label_set"] == pytest.approx(2 / 15) and scores["chance"] == pytest.approx(1 / 7)
    # by hand, so the comparison above cannot pass by both sides being wrong the same way
    assert scores["accuracy"] == pytest.approx(7 / 15) and scores["per_class"]["neutral"]["recall"] == 3 / 5


def test_a_clip_with_several_labels_is_right_when_any_is_named():
    examples = [{"task": "emotion", "answer": "joy", "references": ["joy", "surprise"]},
                {"task": "emotion", "answer": "anger", "references": ["anger"]}]
    scores = metrics.score(examples, ["Surprise", "joy"], label_tasks={"emotion": EMOTIONS})["emotion"]
    assert scores["accuracy"] == 0.5 and scores["confusion"]["surprise"]["surprise"] == 1
    assert answers.is_correct(examples[0], "surprise", EMOTIONS) and not answers.is_correct(examples[1], "joy",
                                                                                            EMOTIONS)


def test_an_expected_label_outside_the_declared_set_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected answers \['happy'\] are not in the task's label set"):
        metrics.score([{"task": "emotion", "answer": "happy"}], ["joy"], label_tasks={"emotion": EMOTIONS})


def test_similarity_encodes_each_distinct_sentence_once_with_the_same_result():
    """Difference answers and a small model's captions repeat (the quickstart's: 1 296 texts, 159 distinct): each
    distinct text is encoded once, and the score is the one every text encoded by itself gives."""
    predictions = [*PREDICTIONS, PREDICTIONS[0], REFERENCES[1][0]]
    references = [*REFERENCES, REFERENCES[0], [REFERENCES[1][0], PREDICTIONS[0]]]
    scorer = metrics.CaptionScorer()
    similarity = scorer.sentence_similarity(predictions, references)
    model = scorer._sentence_model
    encoded = []
    original = model.encode
    model.encode = lambda texts, **settings: encoded.append(list(texts)) or original(texts, **settings)
    assert scorer.sentence_similarity(predictions, references) == similarity
    [texts] = encoded
    assert sorted(texts) == sorted({*predictions, *(text for texts in references for text in texts)})
    one_by_one = [sum(float(original([prediction], normalize_embeddings=True)[0]
                            @ original([reference], normalize_embeddings=True)[0]) for reference in texts) / len(texts)
                  for prediction, texts in zip(predictions, references)]
    assert similarity == pytest.approx(sum(one_by_one) / len(one_by_one), abs=1e-6)
    assert scorer.sentence_similarity(PREDICTIONS, REFERENCES) == pytest.approx(REFERENCE_VALUES["similarity"],
                                                                                abs=1e-6)


@needs_java
def test_scoring_writes_nothing_into_the_pycocoevalcap_package():
    """A shared environment's site-packages is read-only: the PTB tokenizer's input file goes to a temporary
    folder (pycocoevalcap's own wrapper writes it beside its jar). Every file opened for writing while the
    captions are scored is recorded by an audit hook."""
    import os
    import sys

    package = str(metrics._package_dir())
    written, watching = [], [True]

    def record(event, arguments):
        if watching[0] and event == "open" and isinstance(arguments[0], (str, bytes, os.PathLike)):
            flags = arguments[2] if isinstance(arguments[2], int) else 0
            mode = arguments[1] if isinstance(arguments[1], str) else ""
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) or any(c in mode for c in "wax+"):
                written.append(os.fsdecode(arguments[0]))

    sys.addaudithook(record)  # hooks cannot be removed: this one stops recording when the test ends
    try:
        scorer = metrics.CaptionScorer(similarity=False)
        scores = scorer.scores(PREDICTIONS, REFERENCES)
        scorer.close()
    finally:
        watching[0] = False
    assert any("mellow-ptb-" in path for path in written)  # the hook sees the tokenizer's input file
    assert not [path for path in written if os.path.abspath(path).startswith(package)], written
    for name in ("bleu_4", "meteor", "rouge_l", "cider_d"):
        assert scores[name] == pytest.approx(REFERENCE_VALUES[name], abs=1e-6), name
