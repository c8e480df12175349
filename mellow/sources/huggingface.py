"""`hf:` sources: a dataset in the Hugging Face `datasets` layout, from a local folder or the HF cache (offline).

The folder holds Parquet shards (`data/<split>-00000-of-00004.parquet`, `<split>.parquet`, or per-split folders,
as the Hub publishes them and `Dataset.to_parquet` writes them) or `save_to_disk` Arrow shards
(`<split>/data-00000-of-00001.arrow`). A file's split comes from its name, else from its folders; a file with
neither gets each clip's split drawn from a hash of its id. A split no file provides (many Hub datasets publish
train and test only, or train alone) is carved from the train clips by the same hash, with --val-fraction /
--test-fraction, and prepare says so.

Columns play roles (`--columns role=column,...`):
- `audio`: an `Audio` feature (a struct of `bytes` and `path`), raw bytes, or a path string. Default: the column
  the file's `datasets` metadata declares as Audio, else the first struct column with a `bytes` field, else `audio`.
- `id`: the clip id. Default: an `id` column, else the stem of the audio's `path`, else `<file>-<row>`. Rows that
  repeat the same id and the same audio (AudioCaps: one row per caption) are one clip.
- `caption`: one caption (or a list). Default: `captions`, else every `caption` / `caption_N` column.
- `question`, `answer`: a question/answer example per row. Default: `question` (or `prompt`) and `answer`.
- `task`: the example's task name (default: `task` if present, else yes_no / qa from the answer).
`--label-field` columns become closed-label tasks, as for the other sources.

The audio bytes stay in the shards: a record names its file, row and column, and 01_precompute reads that column
a row group at a time (never a whole file into RAM) and hands the bytes to ffmpeg.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from mellow.audio.sources import arrow_reader, batches
from mellow.files import sha256_file
from mellow.progress import console, progress_bar
from mellow.sources.common import SPLIT_NAMES, Imported, hash_split, label_values
from mellow.sources.config import PrepareConfig, parse_columns

SUFFIXES = (".parquet", ".arrow")


def dataset_folder(location: str) -> Path:
    """A local folder as it is, or the snapshot of a Hub dataset id (`owner/name`) in the HF cache."""
    if Path(location).is_dir():
        return Path(location)
    from mellow.hub import HUB_ID, model_folder

    if HUB_ID.fullmatch(location) and not Path(location).exists():
        return model_folder(location, "--source", repo_type="dataset")
    raise FileNotFoundError(f"--source hf:{location}: no such folder (nor a Hub dataset id such as "
                            "owner/name in the Hugging Face cache)")


def shard_files(folder: Path) -> list[Path]:
    """Every Parquet / Arrow shard under `folder`, in name order (the datasets library's own cache files aside)."""
    files = sorted(path for path in folder.rglob("*") if path.suffix in SUFFIXES and path.is_file()
                   and not path.name.startswith("cache-"))
    if not files:
        raise ValueError(f"--source hf:{folder}: no .parquet or .arrow files under it; hf: reads a dataset in the "
                         "datasets library's layout (data/<split>-00000-of-00001.parquet, or save_to_disk)")
    return files


def split_of(path: Path, folder: Path) -> str | None:
    """train / val / test from a shard's name (`test-00000-of-00002`), else from its folders (nearest first)."""
    names = [path.stem] + [part for part in reversed(path.relative_to(folder).parent.parts)]
    for name in names:
        word = re.split(r"[^A-Za-z]+", name.lower())[0]
        if word in SPLIT_NAMES:
            return SPLIT_NAMES[word]
    return None


def _schema(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_schema(path)
    with pa.memory_map(str(path)) as source:
        return arrow_reader(source).schema


def choose_columns(schema, named: dict[str, str], label_fields: dict[str, str], where: str) -> dict[str, object]:
    """{role: column (or list of caption columns)} for one file's schema: the named ones, checked, and defaults."""
    import pyarrow as pa

    names = list(schema.names)
    for column in [*named.values(), *label_fields]:
        if column not in names:
            raise ValueError(f"{where}: no column {column!r} (its columns: {', '.join(names)})")
    chosen: dict[str, object] = dict(named)
    if "audio" not in chosen:
        declared = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
        features = declared.get("info", {}).get("features", {})
        audio = [name for name, feature in features.items() if isinstance(feature, dict)
                 and feature.get("_type") == "Audio" and name in names]
        audio += [field.name for field in schema if pa.types.is_struct(field.type)
                  and field.type.get_field_index("bytes") >= 0]
        audio += [name for name in names if name == "audio"]
        if not audio:
            raise ValueError(f"{where}: no audio column (an Audio feature, a struct with bytes, or `audio`) among "
                             f"{', '.join(names)}; name it with --columns audio=<column>")
        chosen["audio"] = audio[0]
    if "id" not in chosen and "id" in names:
        chosen["id"] = "id"
    if "caption" not in chosen:
        captions = ["captions"] if "captions" in names else [n for n in names if re.fullmatch(r"caption(_\d+)?", n)]
        if captions:
            chosen["caption"] = captions
    for role, defaults in (("question", ("question", "prompt")), ("answer", ("answer",)), ("task", ("task",))):
        if role not in chosen:
            found = next((name for name in defaults if name in names), None)
            if found:
                chosen[role] = found
    return chosen


class HubImport:
    """Reads the shards into an Imported: audio records (bytes left in the shards), examples and failures."""

    def __init__(self, folder: Path, columns: dict[str, str], label_fields: dict[str, str], val_fraction: float,
                 test_fraction: float, on_row: Callable[[], None] = lambda: None) -> None:
        self.folder, self.columns, self.label_fields = folder, columns, label_fields
        self.fractions = (val_fraction, test_fraction)
        self.on_row = on_row
        self.imported = Imported()
        self.clip_of: dict[tuple[str, str], str] = {}  # (id, audio sha256) -> clip id
        self.split_of_clip: dict[str, str] = {}
        self.captions: dict[str, list[str]] = {}  # clip -> captions, in row order
        self.hashed: dict[str, str] = {}  # audio file path -> sha256
        self.carved: dict[str, float] = {}  # split the source lacks -> fraction of its train clips that make it

    def run(self) -> Imported:
        files = shard_files(self.folder)
        named = {split_of(path, self.folder) for path in files} - {None}
        if "train" in named:  # a split the source lacks is carved from its train clips
            self.carved = {split: fraction for split, fraction in zip(("val", "test"), self.fractions)
                           if split not in named}
        for split, fraction in self.carved.items():
            console.print(f"--source hf: has no {split} split: {fraction:g} of its train clips (drawn from a hash of "
                          f"each clip id; --{split}-fraction) make it")
        for path in files:
            self.read_file(path)
        for clip, captions in self.captions.items():
            self.imported.add_captions(self.split_of_clip[clip], clip, captions)
        self.imported.close_label_tasks()
        return self.imported

    def read_file(self, path: Path) -> None:
        import pyarrow as pa

        row = 0
        try:
            chosen = choose_columns(_schema(path), self.columns, self.label_fields, f"--source hf: {path}")
            wanted = list(dict.fromkeys([*_flat(chosen.values()), *self.label_fields]))
            split = split_of(path, self.folder)
            for batch in batches(path, wanted):
                for values in batch.to_pylist():
                    self.on_row()
                    self.read_row(path, row, values, chosen, split)
                    row += 1
        except (pa.ArrowException, OSError) as error:  # a damaged or truncated shard: report it, read the others
            self.imported.failures.append({"where": str(path), "reason": f"reading the file failed after {row} "
                                                                         f"row(s): {error}"})

    def split_of_new_clip(self, clip: str, split: str | None) -> str:
        """The file's split; for a train file, a split the source lacks for some clips; for an unnamed file, a
        split from the hash of the clip id."""
        if split is None:
            return hash_split(clip, *self.fractions)
        if split == "train" and self.carved:
            return hash_split(clip, self.carved.get("val", 0.0), self.carved.get("test", 0.0))
        return split

    def read_row(self, path: Path, row: int, values: dict, chosen: dict, split: str | None) -> None:
        where = f"{path.name} row {row}"
        audio = values[chosen["audio"]]
        data, name = ((audio.get("bytes"), audio.get("path")) if isinstance(audio, dict) else
                      (audio, None) if isinstance(audio, bytes) else (None, audio if isinstance(audio, str) else None))
        record: dict = {}
        if data:
            digest = hashlib.sha256(data).hexdigest()
            record = {"path": f"{path}#{row}", "parquet": str(path), "row": row, "column": chosen["audio"]}
        elif name:
            file = Path(name) if Path(name).is_absolute() else path.parent / name
            if not file.is_file():
                self.imported.failures.append({"where": where, "reason": f"no audio bytes, and its path {name} is "
                                                                         "not a file"})
                return
            digest = self.hashed.get(str(file)) or self.hashed.setdefault(str(file), sha256_file(file))
            record = {"path": str(file.absolute())}
        else:
            self.imported.failures.append({"where": where, "reason": "no audio: the audio column is empty"})
            return
        given = values.get(chosen.get("id")) if chosen.get("id") else None
        base = str(given) if given not in (None, "") else (Path(name).stem if name else f"{path.stem}-{row}")
        clip = self.clip_of.get((base, digest))
        if clip is None:
            clip, number = base, 1
            while clip in self.split_of_clip:  # the same id for different audio: keep both, told apart
                number += 1
                clip = f"{base}~{number}"
            self.clip_of[(base, digest)] = clip
            self.split_of_clip[clip] = self.split_of_new_clip(clip, split)
            self.imported.records.append({"id": clip, **record, "duration": None, "sha256": digest,
                                          "split": self.split_of_clip[clip]})
        clip_split = self.split_of_clip[clip]
        captions = chosen.get("caption")
        for column in [captions] if isinstance(captions, str) else captions or []:
            text = values.get(column)
            for caption in [text] if isinstance(text, str) else (text or []):
                if str(caption).strip():
                    self.captions.setdefault(clip, []).append(str(caption).strip())
        for column, task in self.label_fields.items():
            labels = label_values(values.get(column))
            if labels:
                self.imported.labelled.append((clip_split, clip, task, labels))
        question = values.get(chosen.get("question")) if chosen.get("question") else None
        answer = values.get(chosen.get("answer")) if chosen.get("answer") else None
        if question not in (None, "") and answer not in (None, ""):
            answer = str(answer)
            task = str(values.get(chosen.get("task")) or "") if chosen.get("task") else ""
            task = task or ("yes_no" if answer.strip(" .").lower() in ("yes", "no") else "qa")
            self.imported.add(clip_split, {"task": task, "subtask": task, "audio1": clip, "audio2": None,
                                           "prompt": str(question), "answer": answer})


def _flat(values) -> list[str]:
    return [name for value in values for name in ([value] if isinstance(value, str) else value)]


def load(location: str, config: PrepareConfig) -> Imported:
    """`hf:<folder|owner/name>`: index a dataset in the Hugging Face layout; the audio stays in its Parquet / Arrow
    shards."""
    with progress_bar() as progress:
        task = progress.add_task("reading rows", total=None)
        imported = import_hub_dataset(location, parse_columns(config.columns), config.label_fields(),
                                      config.val_fraction, config.test_fraction, on_row=lambda: progress.advance(task))
    imported.read, imported.empty = "its rows", "its shards hold no rows"
    return imported


def import_hub_dataset(location: str, columns: dict[str, str], label_fields: dict[str, str], val_fraction: float,
                       test_fraction: float, on_row: Callable[[], None] = lambda: None) -> Imported:
    """Read an hf: source (see the module docstring)."""
    return HubImport(dataset_folder(location), columns, label_fields, val_fraction, test_fraction, on_row).run()

