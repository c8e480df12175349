"""`folder:<manifest>`: your own folder, a CSV or JSON-lines manifest whose rows name an audio file (`path`, or
file_name / file / filename / audio) relative to the manifest's folder (or --audio-root), with captions
(`caption`, caption_1..N, or `captions`: a list, in a CSV cell a JSON list; a file named on several rows gets
every row's captions) and/or a question (`prompt` or question, `answer`, optional `task`, second audio
`path2`), an optional `split`, `start` and `duration`. Rows are numbered as data rows, from 1."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mellow.progress import console
from mellow.sources.common import SPLIT_NAMES, ClipCatalog, Imported, hash_split, label_values, parse_number, read_csv
from mellow.sources.config import PrepareConfig
from mellow.sources.reasonaqa import read_rows
from mellow.sources.registry import existing

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
    rows = read_csv(manifest) if manifest.suffix.lower() == ".csv" else read_rows(manifest)
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
    start, duration = (parse_number(row.get(key)) for key in ("start", "duration"))
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


def load(location: str, config: PrepareConfig) -> Imported:
    """`folder:<manifest.csv|jsonl>`."""
    return import_folder(existing(location, config.source), config.audio_root, config.val_fraction,
                         config.test_fraction, config.label_fields())
