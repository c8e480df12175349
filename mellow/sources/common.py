"""What the imported layouts share: the `Imported` result every source returns, the clip catalog that gives
each file an id (and reports the missing ones, with the rows that needed them), splits drawn from a hash of the
id, closed-label tasks, and CSV reading that repairs MELD's mixed encodings.

The audio of an imported layout stays where it is: a record's `path` is absolute, with `start` (seconds)
when the clip is a piece of a longer file."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "eval": "test", "evaluation": "test"}


CAPTION_PROMPT = "Describe the audio."


AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mka", ".mp4", ".mkv"}


@dataclass
class Imported:
    """What an importer found: audio records, examples per split, and what it skipped (with why)."""

    records: list[dict] = field(default_factory=list)
    examples: dict[str, list[dict]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    failures: list[dict] = field(default_factory=list)
    label_tasks: dict[str, list[str]] = field(default_factory=dict)  # closed-label task -> its labels
    labelled: list[tuple[str, str, str, list[str]]] = field(default_factory=list)  # (split, clip, task, labels)
    read: str = "its manifests"  # what was read, for the message when no audio was usable
    empty: str = ""  # why nothing was found, when nothing failed
    details: dict = field(default_factory=dict)  # more for prepare.json (a benchmark's release file and its sha256)

    def add(self, split: str, example: dict) -> None:
        self.examples[split].append({**example, "split": split})

    def close_label_tasks(self) -> None:
        """Turn the labels read per clip (`labelled`) into closed-label examples, once every clip is read: a
        task's label set is every label its clips hold."""
        tasks, examples = label_examples(self.labelled)
        self.label_tasks.update(tasks)
        for split, example in examples:
            self.add(split, example)
        self.labelled = []

    def add_captions(self, split: str, clip: str, captions: list[str]) -> None:
        """Training learns every caption (one example each); validation and test score one answer per clip
        against all of them."""
        for answer in captions if split == "train" else captions[:1]:
            self.add(split, {"task": "caption", "subtask": "caption", "audio1": clip, "audio2": None,
                             "prompt": CAPTION_PROMPT, "answer": answer, "references": captions})


class ClipCatalog:
    """Gives each (file, start) an id and an audio record, checking once per file that it exists."""

    def __init__(self, imported: Imported) -> None:
        self.imported = imported
        self.ids: dict[tuple[str, float | None], str] = {}
        self.taken: set[str] = set()
        self.missing: dict[str, dict] = {}

    def clip(self, path: Path, name: str, split: str, where: str, start: float | None = None,
             duration: float | None = None) -> str | None:
        """The id of the clip at `path` (from `start`, lasting `duration`), or None if the file is missing;
        `name` is what the manifest called it, `where` the row that asked for it (for the report)."""
        path = path.absolute()
        key = (str(path), start)
        if key in self.ids:
            return self.ids[key]
        if str(path) in self.missing or not path.is_file():
            if str(path) not in self.missing:
                self.missing[str(path)] = {"path": str(path), "reason": "audio file not found", "rows": 0,
                                           "needed_by": []}
                self.imported.failures.append(self.missing[str(path)])
            failure = self.missing[str(path)]
            failure["rows"] += 1
            if len(failure["needed_by"]) < 10:
                failure["needed_by"].append(where)
            return None
        base = re.sub(r"\.[^./]*$", "", name) + (f"_{start:g}" if start else "")
        clip_id, number = base, 1
        while clip_id in self.taken:  # `a.wav` and `a.flac`, or a file named twice by different spellings
            number += 1
            clip_id = f"{base}~{number}"
        self.ids[key] = clip_id
        self.taken.add(clip_id)
        self.imported.records.append({"id": clip_id, "path": str(path), "split": split,
                                      **({"start": start} if start is not None else {}), "duration": duration})
        return clip_id


def hash_split(clip_id: str, val_fraction: float, test_fraction: float) -> str:
    """A split drawn from a hash of the id: stable across runs and machines, and for a clip added later."""
    draw = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if draw < test_fraction else "val" if draw < test_fraction + val_fraction else "train"


RESERVED_TASKS = ("caption", "yes_no", "multiple_choice", "comparison", "difference", "qa")


def parse_label_fields(fields: str, tasks: str) -> dict[str, str]:
    """{field: task} from --label-field / --label-task (comma-separated, in the same order; a task defaults to
    its field's name)."""
    names = [name.strip() for name in fields.split(",") if name.strip()]
    given = [name.strip() for name in tasks.split(",") if name.strip()]
    if given and len(given) != len(names):
        raise ValueError(f"--label-task {tasks!r} names {len(given)} task(s) for {len(names)} --label-field(s)")
    mapping = dict(zip(names, given or names))
    reserved = [task for task in mapping.values() if task in RESERVED_TASKS or not re.fullmatch(r"[\w+-]+", task)]
    if reserved:
        raise ValueError(f"--label-task {reserved[0]!r}: a closed-label task needs a name of letters, digits, _, + "
                         f"or -, other than {', '.join(RESERVED_TASKS)}")
    return mapping


def label_values(value: object) -> list[str]:
    """The labels of one field: a list, or a string of one label or several joined by ';' or '|'."""
    values = value if isinstance(value, list) else re.split(r"[;|]", str(value)) if value not in (None, "") else []
    return list(dict.fromkeys(str(label).strip().lower() for label in values if str(label).strip()))


def label_prompt(task: str, labels: list[str]) -> str:
    return f"Which {task.replace('_', ' ')} does the audio express? Answer with one of: {', '.join(labels)}."


def label_examples(labelled: list[tuple[str, str, str, list[str]]]) -> tuple[dict[str, list[str]],
                                                                               list[tuple[str, dict]]]:
    """({task: sorted labels}, [(split, example)]) from (split, clip, task, labels) per clip and task. Training
    gets one example per label of a clip; validation and test one per clip, right when it names any label."""
    tasks = {task: sorted({label for _, _, name, labels in labelled if name == task for label in labels})
             for task in sorted({task for _, _, task, _ in labelled})}
    examples = []
    for split, clip, task, labels in labelled:
        for answer in labels if split == "train" else labels[:1]:
            examples.append((split, {"task": task, "subtask": task, "audio1": clip, "audio2": None,
                                     "prompt": label_prompt(task, tasks[task]), "answer": answer,
                                     "references": labels}))
    return tasks, examples


def read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a CSV file with a header, checked to have the `required` columns."""
    return read_csv_text(path, path.read_text(encoding="utf-8-sig"), required)


def parse_number(text: object) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def audio_files_by_stem(root: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(root.rglob("*")) if path.suffix.lower() in AUDIO_SUFFIXES}


MOJIBAKE = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e"
                      "\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]+")


def repaired_text(path: Path) -> str:
    """A text file of mixed encodings as readable text: each line as UTF-8, or as cp1252 where it is not valid
    UTF-8, then UTF-8 that was once misread as cp1252 ("â€™") read again as what it was ("’")."""
    lines = []
    for raw in path.read_bytes().splitlines(keepends=True):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("cp1252", errors="replace")
        lines.append(MOJIBAKE.sub(_undo_mojibake, line))
    return "".join(lines).removeprefix("\ufeff")


def _undo_mojibake(match: re.Match) -> str:
    try:
        return match.group(0).encode("cp1252").decode("utf-8")
    except UnicodeError:
        return match.group(0)


def read_csv_text(path: Path, text: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of CSV `text` (read from `path`), checked to have the `required` columns."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} column (its header: {', '.join(reader.fieldnames or [])}"
                         "); is it the right file?")
    return list(reader)

