"""Every dataset source 00_prepare reads, in one table: `00_prepare` dispatches on it, `PrepareConfig` checks
`--source` against it, and `--help` lists it from it. A source's module is imported only when it is read.

Each source module has `load(location, config) -> Imported`: the audio records, the examples per split, what
it skipped (with why) and its closed-label tasks."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mellow.sources.common import Imported
    from mellow.sources.config import PrepareConfig


@dataclass(frozen=True)
class SourceKind:
    name: str  # what comes before the colon of --source
    usage: str  # the location it takes, as --help shows it
    summary: str  # what it is, for --help
    audio: Literal["written", "files", "contained"]  # synth writes its audio; imported layouts name audio files,
    # which 00_prepare hashes; the audio of tars and Parquet shards stays in them, hashed as it is read
    folder: bool  # its location is a folder (a dataset named after the source takes the folder's name)
    module: str  # mellow.sources.<module>.<loader> reads it
    loader: str = "load"


SOURCES = (
    SourceKind("synth", "synth", "the built-in synthetic sound scenes (audio written here)", "written", False,
               "synth"),
    SourceKind("wds", "wds:<tars>", "WebDataset tars of audio + json (local paths, brace patterns such as "
               "part-{0000..0099}.tar, http(s):// URLs or pipe:<command>; several joined with ::, as webdataset "
               "does), whose audio stays in the tars", "contained", False, "wds"),
    SourceKind("hf", "hf:<folder|owner/name>", "a dataset in the Hugging Face datasets layout (Parquet or "
               "save_to_disk Arrow shards; a Hub id is read from the HF cache), whose audio stays in the shards "
               "(see --columns)", "contained", True, "huggingface"),
    SourceKind("mellow", "mellow:<json>[,...]", "Mellow/ReasonAQA release files; split from the file name or "
               "split=file", "files", False, "reasonaqa"),
    SourceKind("clotho", "clotho:<folder>", "Clotho's captions CSVs beside its audio folders", "files", True,
               "clotho"),
    SourceKind("audiocaps", "audiocaps:<folder>", "AudioCaps' CSVs and its audio files", "files", True,
               "audiocaps"),
    SourceKind("meld", "meld:<MELD.Raw folder>", "MELD.Raw's CSVs and videos (emotion and sentiment)", "files",
               True, "meld"),
    SourceKind("folder", "folder:<manifest.csv|jsonl>", "your own folder: a CSV or JSON-lines manifest of audio "
               "files with captions and/or questions", "files", False, "folder"),
    SourceKind("mmau", "mmau:<json>", "the MMAU benchmark's release file (mmau-test-mini.json or mmau-test.json), "
               "scored by its own protocol", "files", False, "benchmarks", "load_mmau"),
    SourceKind("mmar", "mmar:<json>", "the MMAR benchmark's release file (MMAR-meta.json), scored by its own "
               "protocol", "files", False, "benchmarks", "load_mmar"),
)
KINDS = {kind.name: kind for kind in SOURCES}


def kind_of(source: str) -> SourceKind | None:
    """The kind `source` names (`synth`, or `kind:location` with a location), or None."""
    if source == "synth":
        return KINDS["synth"]
    name, colon, location = source.partition(":")
    kind = KINDS.get(name)
    return kind if colon and kind is not None and kind.name != "synth" and location.strip() else None


def source_help() -> str:
    """The --source help: every kind, from the table."""
    kinds = "; ".join(f"`{kind.usage}`: {kind.summary}" for kind in SOURCES)
    return f"Where the data comes from: {kinds}. Imported audio stays where it is; see docs/datasets.md."


def load(config: PrepareConfig) -> Imported:
    """Read the source `config.source` names, with its module's loader."""
    kind = kind_of(config.source)
    if kind is None:
        raise ValueError(f"--source {config.source!r}: unknown kind")
    module = importlib.import_module(f"mellow.sources.{kind.module}")
    return getattr(module, kind.loader)(config.source.partition(":")[2], config)


def existing(location: str, source: str) -> Path:
    """The path a source's location names; an error naming --source if it is not there."""
    path = Path(location)
    if not path.exists():
        raise FileNotFoundError(f"--source {source}: {path} does not exist")
    return path
