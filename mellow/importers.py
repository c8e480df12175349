"""Importers for 00_prepare: published dataset layouts into mellow's audio records and examples.

Sources (the `--source` of `mellow prepare`):
    mellow:<json>[,<json>...]   Mellow / ReasonAQA release files: a JSON list (or JSON lines) of
                                {taskname, filepath1, filepath2, caption1, caption2, input, answer, subtype}.
                                A file's split comes from its name (train / val, valid, dev / test) or is given
                                as split=path; audio paths start at --audio-root (default: the file's folder).
    clotho:<folder>             Clotho: clotho_captions_{development,validation,evaluation}.csv
                                (file_name, caption_1..caption_5) beside the development/, validation/ and
                                evaluation/ audio folders (-> train / val / test).
    audiocaps:<folder>          AudioCaps: {train,val,test}.csv (audiocap_id, youtube_id, start_time, caption)
                                and audio files anywhere below the folder named by YouTube id (`<id>.wav` or
                                `Y<id>.wav`, any format), each cut at start_time for 10 s when encoded; or
                                already cut, named `<id>_<start_time>`.
    meld:<folder>               MELD.Raw: {train,dev,test}_sent_emo.csv (Sr No., Utterance, Speaker, Emotion,
                                Sentiment, Dialogue_ID, Utterance_ID, ...) beside train_splits/,
                                dev_splits_complete/ and output_repeated_splits_test/ holding dia{D}_utt{U}.mp4
                                (the audio track is decoded straight from the video). Two closed-label tasks per
                                utterance: emotion (7 labels) and sentiment (3); --meld-text puts the transcript in
                                the prompt. The CSVs' mixed encodings (cp1252 bytes, mojibake) are repaired.
    folder:<manifest>           Your own folder: a CSV or JSON-lines manifest whose rows name an audio file
                                (`path`, or file_name / file / filename / audio) relative to the manifest's folder
                                (or --audio-root), with captions (`caption`, caption_1..N, or `captions`: a
                                list, in a CSV cell a JSON list; a file named on several rows gets every row's
                                captions) and/or a question (`prompt` or question, `answer`, optional `task`,
                                second audio `path2`), an optional `split`, `start` and `duration`.

The audio stays where it is: a record's `path` is absolute, with `start` (seconds) when the clip is a piece of
a longer file. A file a manifest names that is not there is reported (with the rows that needed it) and
skipped; the rest of the dataset is imported. Rows are numbered as data rows, from 1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from mellow.progress import console

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "eval": "test", "evaluation": "test"}
CAPTION_PROMPT = "Describe the audio."
AUDIOCAPS_SECONDS = 10.0
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mka", ".mp4", ".mkv"}


@dataclass
class Imported:
    """What an importer found: audio records, examples per split, and what it skipped (with why)."""

    records: list[dict] = field(default_factory=list)
    examples: dict[str, list[dict]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    failures: list[dict] = field(default_factory=list)
    label_tasks: dict[str, list[str]] = field(default_factory=dict)  # closed-label task -> its labels
    labelled: list[tuple[str, str, str, list[str]]] = field(default_factory=list)  # (split, clip, task, labels)

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


def import_source(source: str, audio_root: Path | None, val_fraction: float, test_fraction: float,
                  seed: int, meld_text: bool = False, label_fields: dict[str, str] | None = None) -> Imported:
    """Run the importer that `source` (`kind:spec`) names."""
    kind, _, spec = source.partition(":")
    if kind == "mellow":
        return import_mellow(spec, audio_root, seed)
    if kind == "clotho":
        return import_clotho(_existing(Path(spec), source))
    if kind == "audiocaps":
        return import_audiocaps(_existing(Path(spec), source))
    if kind == "folder":
        return import_folder(_existing(Path(spec), source), audio_root, val_fraction, test_fraction, label_fields)
    if kind == "meld":
        return import_meld(_existing(Path(spec), source), meld_text)
    raise ValueError(f"--source {source!r}: unknown kind {kind!r}")


def _existing(path: Path, source: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"--source {source}: {path} does not exist")
    return path


def hash_split(clip_id: str, val_fraction: float, test_fraction: float) -> str:
    """A split drawn from a hash of the id: stable across runs and machines, and for a clip added later."""
    draw = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if draw < test_fraction else "val" if draw < test_fraction + val_fraction else "train"


# Mellow / ReasonAQA ------------------------------------------------------------------------------------------

# Mellow's release marks some examples with an instruction keyword instead of a prompt: the prompt is then drawn
# from paraphrases and the answer built from the captions ("The audio 1 is ..."). Mellow draws a paraphrase
# every time an example is read; here one is drawn per example, from the seed, so the manifests are exact.
MELLOW_PROMPTS = {
    "caption both audios": ("Caption both audios.", "Describe each of the two audios.",
                            "Write a caption for the first and the second audio.",
                            "What can be heard in each of the two recordings?"),
    "caption first audio": ("Caption the first audio.", "Describe the first audio.",
                            "What can be heard in the first recording?"),
    "caption second audio": ("Caption the second audio.", "Describe the second audio.",
                             "What can be heard in the second recording?"),
    "explain the difference in few words": ("In a few words, how do the two audios differ?",
                                            "Name the difference between the two audios briefly.",
                                            "Briefly, what differs between the two recordings?"),
    "explain the difference in a sentence": ("Explain the difference between the two audios in one sentence.",
                                             "In a single sentence, how do the two recordings differ?",
                                             "Describe in one sentence what sets the two audios apart."),
    "explain the difference in detail": ("Explain the difference between the two audios in detail.",
                                         "Describe in detail how the two recordings differ.",
                                         "Give a detailed comparison of the two audios."),
}
MELLOW_EMOTION_QUESTIONS = ("What emotion does the speaker express?", "How does the speaker feel?",
                            "Which emotion can be heard in the voice?")
MELLOW_EMOTION_MARK = "emo_emo_emo"
MELLOW_CAPTIONED = {"caption both audios": (1, 2), "caption first audio": (1,), "caption second audio": (2,)}


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


def mellow_prompt_answer(row: dict, rng: Random) -> tuple[str, str, str]:
    """(task, prompt, answer) of a Mellow/ReasonAQA row, following the release's conventions."""
    instruction = row.get("input", "")
    captions = [str(row.get(key) or "").lower() for key in ("caption1", "caption2")]
    prompts = MELLOW_PROMPTS.get(instruction)
    if instruction in MELLOW_CAPTIONED:
        answer = " ".join(f"The audio {n} is {captions[n - 1]}." for n in MELLOW_CAPTIONED[instruction])
        return "caption", rng.choice(prompts), answer.replace("..", ".")
    if prompts:
        return "difference", rng.choice(prompts), str(row["answer"])
    if MELLOW_EMOTION_MARK in instruction:
        return "qa", instruction.replace(MELLOW_EMOTION_MARK, rng.choice(MELLOW_EMOTION_QUESTIONS)), str(row["answer"])
    answer = str(row["answer"]).lower()
    task = "yes_no" if answer.strip(" .") in ("yes", "no") else "qa"
    return task, instruction.lower(), answer


def import_mellow(spec: str, audio_root: Path | None, seed: int) -> Imported:
    imported = Imported()
    catalog = ClipCatalog(imported)
    rng = Random(seed)
    for split, path in _split_files(spec):
        root = audio_root or path.parent
        for number, row in enumerate(_read_rows(path), 1):  # data rows count from 1
            where = f"{path.name} row {number}"
            missing = [key for key in ("filepath1", "input", "answer") if key not in row]
            if missing:
                imported.failures.append({"where": where, "reason": f"no {', '.join(missing)} field"})
                continue
            task, prompt, answer = mellow_prompt_answer(row, rng)
            audio = [_mellow_clip(catalog, root, row.get(key), split, where) for key in ("filepath1", "filepath2")]
            if not row["filepath1"]:
                imported.failures.append({"where": where, "reason": "filepath1 is empty"})
            if audio[0] is None or (row.get("filepath2") and audio[1] is None):
                continue
            imported.add(split, {"task": task, "subtask": row.get("subtype") or row.get("taskname") or task,
                                 "audio1": audio[0], "audio2": audio[1], "prompt": prompt, "answer": answer,
                                 "source": row})
    return imported


def _mellow_clip(catalog: ClipCatalog, root: Path, filepath: str | None, split: str, where: str) -> str | None:
    if not filepath:
        return None
    relative = filepath.replace("\\", "/")  # the release was written on Windows and Linux alike
    return catalog.clip(root / relative, relative, split, where)


def _split_files(spec: str) -> list[tuple[str, Path]]:
    """[(split, path)] from `a_train.json,b_test.json` or `train=a.json,test=b.json`."""
    files = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        named, _, location = item.rpartition("=")
        path = Path(location)
        split = SPLIT_NAMES.get(named) if named else _split_in_name(path.stem)
        if split is None:
            raise ValueError(f"--source mellow:{spec}: cannot tell the split of {item}; name it as train=<file>, "
                             "val=<file> or test=<file>")
        if not path.is_file():
            raise FileNotFoundError(f"--source mellow:{spec}: {path} does not exist")
        files.append((split, path))
    if not files:
        raise ValueError("--source mellow: name at least one JSON file, e.g. mellow:train=reasonaqa_train.json")
    return files


def _split_in_name(stem: str) -> str | None:
    found = {SPLIT_NAMES[word] for word in re.split(r"[^a-z]+", stem.lower()) if word in SPLIT_NAMES}
    return found.pop() if len(found) == 1 else None


def _read_rows(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines: it is not UTF-8 text") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path} must hold a list of objects (one per example)")
    return rows


# Clotho ------------------------------------------------------------------------------------------------------

CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}


def import_clotho(root: Path) -> Imported:
    imported = Imported()
    catalog = ClipCatalog(imported)
    found = [name for name in CLOTHO_SPLITS if (root / f"clotho_captions_{name}.csv").is_file()]
    if not found:
        raise FileNotFoundError(f"--source clotho:{root}: no clotho_captions_<development|validation|evaluation>.csv "
                                "there; point it at the folder the Clotho archives were extracted into")
    for name in found:
        split = CLOTHO_SPLITS[name]
        for number, row in enumerate(_read_csv(root / f"clotho_captions_{name}.csv", ("file_name",)), 1):
            captions = [row[key].strip() for key in sorted(row) if key.startswith("caption") and row[key].strip()]
            clip = catalog.clip(root / name / row["file_name"], f"{name}/{row['file_name']}", split,
                                f"clotho_captions_{name}.csv row {number}")
            if clip is not None and captions:
                imported.add_captions(split, clip, captions)
    return imported


def _read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a CSV file with a header, checked to have the `required` columns."""
    return _read_csv_text(path, path.read_text(encoding="utf-8-sig"), required)


# AudioCaps ---------------------------------------------------------------------------------------------------

def import_audiocaps(root: Path) -> Imported:
    imported = Imported()
    catalog = ClipCatalog(imported)
    found = [split for split in SPLITS if (root / f"{split}.csv").is_file()]
    if not found:
        raise FileNotFoundError(f"--source audiocaps:{root}: no train.csv, val.csv or test.csv there")
    files = _audio_files_by_stem(root)
    for split in found:
        captions: dict[tuple[str, float], list[str]] = defaultdict(list)
        rows: dict[tuple[str, float], int] = {}
        for number, row in enumerate(_read_csv(root / f"{split}.csv", ("youtube_id", "start_time", "caption")),
                                     1):
            start = _number(row["start_time"])
            if start is None:
                imported.failures.append({"where": f"{split}.csv row {number}",
                                          "reason": f"start_time {row['start_time']!r} is not a number"})
                continue
            key = (row["youtube_id"], start)
            captions[key].append(row["caption"].strip())
            rows.setdefault(key, number)
        for (youtube_id, start), texts in captions.items():
            where = f"{split}.csv row {rows[youtube_id, start]}"
            clip = _audiocaps_clip(catalog, files, root, youtube_id, start, split, where)
            if clip is not None:
                imported.add_captions(split, clip, texts)
    return imported


def _audiocaps_clip(catalog: ClipCatalog, files: dict[str, Path], root: Path, youtube_id: str, start: float,
                    split: str, where: str) -> str | None:
    """A clip already cut (`<id>_<start>`) is taken whole; a whole video's audio (`<id>`, `Y<id>`) from start."""
    for stem in (f"{youtube_id}_{start:g}", f"{youtube_id}_{int(start)}", f"Y{youtube_id}_{start:g}"):
        if stem in files:
            return catalog.clip(files[stem], youtube_id + f"_{start:g}", split, where, duration=None)
    path = files.get(youtube_id) or files.get(f"Y{youtube_id}") or root / f"{youtube_id}.wav"
    return catalog.clip(path, youtube_id, split, where, start=start, duration=AUDIOCAPS_SECONDS)


def _number(text: object) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _audio_files_by_stem(root: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(root.rglob("*")) if path.suffix.lower() in AUDIO_SUFFIXES}


# A folder + CSV / JSON lines ---------------------------------------------------------------------------------

PATH_COLUMNS = ("path", "file_name", "file", "filename", "audio")
PROMPT_COLUMNS = ("prompt", "question")
CAPTION_COLUMN = re.compile(r"caption(_\d+)?")
OTHER_COLUMNS = ("captions", "answer", "task", "subtask", "split", "start", "duration", "path2")


@dataclass
class FolderRow:
    """One row of a folder manifest, read: its clip (and second clip), split, captions, labels and question."""

    split: str
    clip: str
    second: str | None
    captions: list[str]
    labels: dict[str, list[str]]  # closed-label task -> the row's labels
    question: dict | None  # an example (task, subtask, prompt, answer), or None


def import_folder(manifest: Path, audio_root: Path | None, val_fraction: float, test_fraction: float,
                  label_fields: dict[str, str] | None = None) -> Imported:
    """A CSV / JSON-lines manifest (see the module docstring); `label_fields` ({column: task}) turns columns into
    closed-label tasks. A clip named on several rows gets every caption of those rows (in row order)."""
    imported = Imported()
    catalog = ClipCatalog(imported)
    rows = _read_csv(manifest) if manifest.suffix.lower() == ".csv" else _read_rows(manifest)
    root = audio_root or manifest.parent
    column = _check_columns(manifest, rows, label_fields or {})
    read = [_read_folder_row(imported, catalog, row, column, root, manifest, number,
                             lambda clip_id: hash_split(clip_id, val_fraction, test_fraction), label_fields or {})
            for number, row in enumerate(rows, 1)]  # data rows count from 1
    captions: dict[str, list[str]] = {}  # clip -> every caption its rows give
    for item in filter(None, read):
        captions.setdefault(item.clip, []).extend(item.captions)
    for item in filter(None, read):
        if captions.get(item.clip):  # a clip's caption examples come where its first row was
            imported.add_captions(item.split, item.clip, captions.pop(item.clip))
        imported.labelled.extend((item.split, item.clip, task, labels) for task, labels in item.labels.items())
        if item.question is not None:
            imported.add(item.split, {**item.question, "audio1": item.clip, "audio2": item.second})
    imported.close_label_tasks()
    return imported


def _check_columns(manifest: Path, rows: list[dict], label_fields: dict[str, str]) -> str:
    """The audio path column of a folder manifest, once its columns are known to say what to learn: a caption
    column, a question with its answer, or a --label-field. Anything else is an error listing the columns."""
    found = list(dict.fromkeys(key for row in rows for key in row))
    column = next((name for name in PATH_COLUMNS if name in found), None)
    if column is None:
        raise ValueError(f"--source folder:{manifest}: its rows need an audio path column, one of "
                         f"{', '.join(PATH_COLUMNS)} (found: {', '.join(found) if rows else 'no rows'})")
    absent = [name for name in label_fields if name not in found]
    if absent:
        raise ValueError(f"--label-field {absent[0]}: {manifest} has no such column (found: {', '.join(found)})")
    asks = [name for name in PROMPT_COLUMNS if name in found]
    if asks and "answer" not in found:
        raise ValueError(f"--source folder:{manifest}: its {asks[0]} column needs an answer column (found: "
                         f"{', '.join(found)})")
    known = {column, *PROMPT_COLUMNS, *OTHER_COLUMNS, *label_fields}
    ignored = [name for name in found if name not in known and not CAPTION_COLUMN.fullmatch(name)]
    teaches = asks or "captions" in found or any(CAPTION_COLUMN.fullmatch(name) for name in found) or label_fields
    if not teaches and ignored:
        raise ValueError(f"--source folder:{manifest}: no column says what to learn (found: {', '.join(found)}); "
                         "accepted: caption, captions (a JSON list) or caption_1..caption_N; prompt or question "
                         "with answer; or a label column named by --label-field <column>; besides the audio path ("
                         f"{', '.join(PATH_COLUMNS)}) and {', '.join(OTHER_COLUMNS[2:])}")
    if not teaches:
        console.print(f"note: {manifest.name} names audio files only: the dataset gets clips (to precompute) and no "
                      "examples", highlight=False)
    elif ignored:
        console.print(f"note: {manifest.name}: column(s) {', '.join(ignored)} are not read (--label-field <column> "
                      "makes one a closed-label task)", highlight=False)
    return column


def _row_captions(row: dict, where: str) -> list[str]:
    """A row's captions: `caption` / caption_1..N columns, and a `captions` list (in a CSV cell, written as a JSON
    list: ["a tone", "a beep"]). A `captions` value that is not a list is an error: it is never one caption."""
    listed = row.get("captions")
    if isinstance(listed, str) and listed.strip():
        try:
            listed = json.loads(listed)
        except json.JSONDecodeError:
            listed = None if listed.lstrip().startswith("[") else listed
    if listed not in (None, "") and not (isinstance(listed, list) and all(isinstance(text, str) for text in listed)):
        raise ValueError(f"{where}: captions {row['captions']!r} is not a JSON list of captions, e.g. "
                         '["a tone", "a beep"]; for one caption per row use a caption column, or name the file on '
                         "several rows")
    columns = [row[key] for key in sorted(row) if CAPTION_COLUMN.fullmatch(key)]
    return [str(text).strip() for text in [*columns, *(listed or [])] if str(text or "").strip()]


def _read_folder_row(imported: Imported, catalog: ClipCatalog, row: dict, column: str, root: Path, manifest: Path,
                     number: int, draw_split: Callable[[str], str],
                     label_fields: dict[str, str]) -> FolderRow | None:
    """One manifest row, read (None when its audio is missing or its start or duration are not numbers: that is
    reported as the row's failure, and the rest imports)."""
    where = f"{manifest.name} row {number}"
    name = str(row[column])
    split = SPLIT_NAMES.get(str(row.get("split") or "").lower()) or draw_split(name)
    start, duration = (_number(row.get(key)) for key in ("start", "duration"))
    bad = [f"{key} {row[key]!r}" for key, value in (("start", start), ("duration", duration))
           if row.get(key) not in (None, "") and value is None]
    if bad:
        imported.failures.append({"where": where, "reason": f"{' and '.join(bad)}: not a number of seconds"})
        return None
    captions = _row_captions(row, where)
    clip = catalog.clip(root / name, name, split, where, start=start, duration=duration)
    second = catalog.clip(root / str(row["path2"]), str(row["path2"]), split, where) if row.get("path2") else None
    if clip is None or (row.get("path2") and second is None):
        return None
    labels = {task: found for field_name, task in label_fields.items() if (found := label_values(row.get(field_name)))}
    prompt = next((row[key] for key in PROMPT_COLUMNS if row.get(key)), None)
    question = None
    if prompt and row.get("answer") not in (None, ""):
        answer = str(row["answer"])
        task = row.get("task") or ("yes_no" if answer.strip(" .").lower() in ("yes", "no") else "qa")
        question = {"task": task, "subtask": row.get("subtask") or task, "prompt": str(prompt), "answer": answer}
    return FolderRow(split, clip, second, captions, labels, question)


# MELD ----------------------------------------------------------------------------------------------------------

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
        rows = _read_csv_text(root / table, repaired_text(root / table),
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


def _read_csv_text(path: Path, text: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of CSV `text` (read from `path`), checked to have the `required` columns."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} column (its header: {', '.join(reader.fieldnames or [])}"
                         "); is it the right file?")
    return list(reader)
