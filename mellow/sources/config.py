"""00_prepare's settings: `PrepareConfig`, the dataset name a source gets, and the command that made a
dataset."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from mellow.config import setting
from mellow.hub import HUB_ID
from mellow.manifests import DATASETS_ROOT
from mellow.sources import common, registry

ROLES = ("audio", "id", "caption", "question", "answer", "task")  # the column roles of an hf: source
GENERIC_FILE_NAMES = {"manifest", "metadata", "meta", "data", "dataset", "index", "labels", "audio", "list", "files",
                      "captions", "annotations", "part", "shard"}


def name_of_source(source: str) -> str:
    """The dataset name of a source given without --name: synth for the synthetic set; a Hub dataset's name; a
    folder source's folder; a file source's file name without split words (train, val, test, ...), or the folder
    it lies in where that leaves nothing telling (manifest.csv, train.json); the folder of a source's tars; a
    benchmark's file name, lower-cased (mmau-test-mini, and mmar for MMAR-meta.json)."""
    if source == "synth":
        return "synth"
    kind, _, location = source.partition(":")
    first = location.split("::")[0].split(",")[0].strip()
    first = first.rpartition("=")[2] if kind == "mellow" else first  # split=path
    if first.startswith("pipe:"):
        return kind
    if "://" in first:
        first = first.split("://", 1)[1].partition("/")[2] or first
    path = Path(first).expanduser()
    if kind == "hf" and not path.exists() and HUB_ID.fullmatch(first):
        return first.rsplit("/", 1)[-1]
    if kind in ("mmau", "mmar"):  # a benchmark file's whole name tells which part it is: mmau-test-mini, mmar
        name = path.stem.lower().removesuffix("-meta")
    elif registry.KINDS[kind].folder or path.is_dir():
        name = path.absolute().name
    else:
        name = "-".join(word for word in re.split(r"[^A-Za-z0-9]+", path.stem)
                        if word.lower() not in common.SPLIT_NAMES)
        if kind == "wds" or not name or name.lower() in GENERIC_FILE_NAMES:
            name = path.absolute().parent.name
    return re.sub(r"[^\w.+-]+", "-", name).strip("-.") or kind


@dataclass
class PrepareConfig:
    source: str = setting("synth", registry.source_help())
    name: str = setting("", "Dataset name: the output folder is <root>/<name> (default: synth for the synthetic "
                            "set, else named after the source: its folder, or its file without split words like "
                            "train, e.g. birds for folder:birds/manifest.csv, reasonaqa for "
                            "mellow:reasonaqa_train.json).")
    root: Path = setting(DATASETS_ROOT, "Folder that holds all datasets ($MELLOW_DATASETS).")
    audio_root: Path | None = setting(None, "Folder that relative audio paths of a mellow: or folder: manifest "
                                            "start from (default: the manifest's folder).")
    num_clips: int = setting(800, "Number of synthetic clips to generate (synth only).")
    max_seconds: float = setting(6.0, "Longest synthetic clip in seconds; durations are drawn from [1, max].")
    seed: int = setting(0, "Random seed: the same seed gives the same clips, captions and tasks.")
    val_fraction: float = setting(0.1, "Fraction of clips in the validation split.")
    test_fraction: float = setting(0.15, "Fraction of clips in the test split.")
    comparisons_per_clip: int = setting(3, "Two-audio pairs drawn per clip of a split (synth only).")
    columns: str = setting("", "hf: sources: the column of each role, as role=column pairs (comma-separated); "
                               "roles: audio (default: the Audio feature), id (default: id, else the audio's file "
                               "name), caption (default: captions, or caption / caption_N), question, answer "
                               "(default: question or prompt, and answer) and task, e.g. "
                               "--columns audio=speech,caption=text.")
    label_field: str = setting("", "wds:, hf: and folder: sources: json fields / columns (comma-separated) that hold "
                                   "a clip's label, or labels (a list, or joined by ; or |), each made a "
                                   "closed-label task; its label set is every label found.")
    label_task: str = setting("", "The task name of each --label-field, in the same order (default: the field's "
                                  "name), e.g. --label-field emo --label-task emotion.")
    meld_text: bool = setting(False, "MELD: put each utterance's transcript in the prompt (its subtasks are then "
                                     "emotion+text and sentiment+text).")
    workers: int = setting(0, "Parallel workers writing audio files (0: one per CPU core).")
    overwrite: bool = setting(False, "Replace an existing dataset made with a different config.")

    def __post_init__(self) -> None:
        kind = self.source.partition(":")[0]
        if registry.kind_of(self.source) is None:
            known = registry.KINDS.get(kind)
            if known is not None and known.name != "synth":
                raise ValueError(f"--source {self.source!r} needs a location: {known.usage}")
            raise ValueError(f"--source {self.source!r} is not supported; use one of "
                             f"{', '.join(kind.usage for kind in registry.SOURCES)}")
        if self.name and (self.name in (".", "..") or not re.fullmatch(r"[\w.+-]+", self.name)):
            raise ValueError(f"--name {self.name!r}: a dataset name is one folder name (letters, digits, _ . + -)")
        if self.audio_root is not None and not self.audio_root.is_dir():
            raise FileNotFoundError(f"--audio-root {self.audio_root} is not a folder")
        if self.num_clips < 10:
            raise ValueError(f"--num-clips {self.num_clips} is too small; use at least 10 so every split has clips")
        if not 1.0 < self.max_seconds <= 60:
            raise ValueError(f"--max-seconds {self.max_seconds} must be in (1, 60]")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
        if self.workers < 0:
            raise ValueError(f"--workers {self.workers} must be >= 0")
        if self.label_fields() and kind not in ("wds", "hf", "folder"):
            raise ValueError(f"--label-field reads wds:, hf: and folder: sources, not {self.source!r}")
        if self.columns and kind != "hf":
            raise ValueError(f"--columns names the columns of an hf: source, not of {self.source!r}")
        parse_columns(self.columns)

    def label_fields(self) -> dict[str, str]:
        """{field: closed-label task} from --label-field / --label-task."""
        return common.parse_label_fields(self.label_field, self.label_task)

    @property
    def dataset_name(self) -> str:
        """--name, or the name of the source (name_of_source)."""
        return self.name or name_of_source(self.source)

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.dataset_name


def prepare_command(dataset: Path) -> str:
    """The 00_prepare command that made `dataset`, with the options its prepare.json records (those that differ
    from the defaults), to run it again: with the same options it re-checks the dataset's audio."""
    try:
        recorded = json.loads((dataset / "prepare.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return f"uv run stages/00_prepare.py --name {dataset.name} <the options it was made with>"
    defaults = {spec.name: spec.default if spec.default is not MISSING else spec.default_factory()
                for spec in fields(PrepareConfig)}
    words = ["uv run stages/00_prepare.py"]
    for key, value in recorded.items():
        flag = "--" + key.replace("_", "-")
        if key != "name" and (value == defaults.get(key) or str(value) == str(defaults.get(key))):
            continue
        words.append((flag if value else f"--no-{flag[2:]}") if isinstance(value, bool)
                     else f"{flag} {shlex.quote(str(value))}")
    return " ".join(words + [f"--root {shlex.quote(str(dataset.parent))}"])


def parse_columns(text: str) -> dict[str, str]:
    """`audio=sound,caption=text` → {role: column}; an unknown role or a malformed pair is an error."""
    roles: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        role, equals, column = (piece.strip() for piece in pair.partition("="))
        if not equals or not column or role not in ROLES:
            raise ValueError(f"--columns {text!r}: {pair!r} is not role=column with a role among {', '.join(ROLES)}")
        roles[role] = column
    return roles
