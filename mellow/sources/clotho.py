"""`clotho:<folder>`: Clotho's clotho_captions_{development,validation,evaluation}.csv (file_name,
caption_1..caption_5) beside the development/, validation/ and evaluation/ audio folders (-> train / val /
test)."""

from __future__ import annotations

from pathlib import Path

from mellow.sources.common import ClipCatalog, Imported, read_csv
from mellow.sources.config import PrepareConfig
from mellow.sources.registry import existing

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
        for number, row in enumerate(read_csv(root / f"clotho_captions_{name}.csv", ("file_name",)), 1):
            captions = [row[key].strip() for key in sorted(row) if key.startswith("caption") and row[key].strip()]
            clip = catalog.clip(root / name / row["file_name"], f"{name}/{row['file_name']}", split,
                                f"clotho_captions_{name}.csv row {number}")
            if clip is not None and captions:
                imported.add_captions(split, clip, captions)
    return imported


def load(location: str, config: PrepareConfig) -> Imported:
    """`clotho:<folder>`."""
    return import_clotho(existing(location, config.source))
