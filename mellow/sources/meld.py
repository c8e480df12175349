"""`meld:<folder>`: MELD.Raw's {train,dev,test}_sent_emo.csv (Sr No., Utterance, Speaker, Emotion, Sentiment,
Dialogue_ID, Utterance_ID, ...) beside train_splits/, dev_splits_complete/ and output_repeated_splits_test/
holding dia{D}_utt{U}.mp4 (the audio track is decoded straight from the video). Two closed-label tasks per
utterance: emotion (7 labels) and sentiment (3); --meld-text puts the transcript in the prompt."""

from __future__ import annotations

from pathlib import Path

from mellow.sources.common import ClipCatalog, Imported, read_csv_text, repaired_text
from mellow.sources.config import PrepareConfig
from mellow.sources.registry import existing

MELD_SPLITS = {"train": ("train_sent_emo.csv", "train_splits"), "val": ("dev_sent_emo.csv", "dev_splits_complete"),
               "test": ("test_sent_emo.csv", "output_repeated_splits_test")}


MELD_LABELS = {"emotion": ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"],
               "sentiment": ["negative", "neutral", "positive"]}


MELD_QUESTIONS = {"emotion": "Which emotion does the speaker express?",
                  "sentiment": "Is the speaker's sentiment negative, neutral or positive?"}


def import_meld(root: Path, with_text: bool) -> Imported:
    """MELD.Raw's layout (see the module docstring); every utterance gives an emotion and a sentiment example."""
    imported = Imported(label_tasks=MELD_LABELS)
    catalog = ClipCatalog(imported)
    found = [split for split, (table, _) in MELD_SPLITS.items() if (root / table).is_file()]
    if not found:
        raise FileNotFoundError(f"--source meld:{root}: no train_sent_emo.csv, dev_sent_emo.csv or "
                                "test_sent_emo.csv there; point it at the extracted MELD.Raw folder")
    for split in found:
        table, folder = MELD_SPLITS[split]
        rows = read_csv_text(root / table, repaired_text(root / table),
                              ("Utterance", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"))
        for number, row in enumerate(rows, start=2):  # line 1 is the header
            where = f"{table} line {number}"
            name = f"dia{row['Dialogue_ID'].strip()}_utt{row['Utterance_ID'].strip()}.mp4"
            labels = {"emotion": row["Emotion"].strip().lower(), "sentiment": row["Sentiment"].strip().lower()}
            wrong = [f"{task} {label!r}" for task, label in labels.items() if label not in MELD_LABELS[task]]
            if wrong:
                imported.failures.append({"where": where, "reason": f"{', '.join(wrong)} is not a MELD label"})
                continue
            clip = catalog.clip(root / folder / name, f"{folder}/{name}", split, where)
            if clip is None:
                continue
            said = " ".join(row["Utterance"].split())
            for task, label in labels.items():
                context = f'The speaker says: "{said}". ' if with_text else ""
                prompt = f"{context}{MELD_QUESTIONS[task]} Answer with one of: {', '.join(MELD_LABELS[task])}."
                imported.add(split, {"task": task, "subtask": f"{task}+text" if with_text else task, "audio1": clip,
                                     "audio2": None, "prompt": prompt, "answer": label, "speaker": row.get("Speaker"),
                                     "transcript": said})
    return imported


def load(location: str, config: PrepareConfig) -> Imported:
    """`meld:<MELD.Raw folder>`."""
    return import_meld(existing(location, config.source), config.meld_text)
