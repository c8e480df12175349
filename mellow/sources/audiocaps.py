"""`audiocaps:<folder>`: AudioCaps' {train,val,test}.csv (audiocap_id, youtube_id, start_time, caption) and
audio files anywhere below the folder named by YouTube id (`<id>.wav` or `Y<id>.wav`, any format), each cut at
start_time for 10 s when encoded; or already cut, named `<id>_<start_time>`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mellow.sources.common import SPLITS, ClipCatalog, Imported, audio_files_by_stem, parse_number, read_csv
from mellow.sources.config import PrepareConfig
from mellow.sources.registry import existing

AUDIOCAPS_SECONDS = 10.0


def import_audiocaps(root: Path) -> Imported:
    imported = Imported()
    catalog = ClipCatalog(imported)
    found = [split for split in SPLITS if (root / f"{split}.csv").is_file()]
    if not found:
        raise FileNotFoundError(f"--source audiocaps:{root}: no train.csv, val.csv or test.csv there")
    files = audio_files_by_stem(root)
    for split in found:
        captions: dict[tuple[str, float], list[str]] = defaultdict(list)
        rows: dict[tuple[str, float], int] = {}
        for number, row in enumerate(read_csv(root / f"{split}.csv", ("youtube_id", "start_time", "caption")),
                                     1):
            start = parse_number(row["start_time"])
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


def load(location: str, config: PrepareConfig) -> Imported:
    """`audiocaps:<folder>`."""
    return import_audiocaps(existing(location, config.source))
