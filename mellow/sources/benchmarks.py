"""`mmau:<file>` and `mmar:<file>`: the public audio-reasoning benchmarks MMAU and MMAR, read from their release
files as published, to be scored by their own protocol (04_eval; mellow/evaluate/benchmark.py).

MMAU (github.com/Sakshi113/MMAU): `mmau-test-mini.json` or `mmau-test.json`, a JSON list of records {id,
audio_id (`./test-mini-audios/<id>.wav`, relative to the file's folder), question, choices, answer (absent in the
test set, whose answers are withheld), task (sound / music / speech), category, sub-category, difficulty,
dataset, split}. MMAR (github.com/ddlBoJack/MMAR): `MMAR-meta.json` (or JSON lines), records {id, audio_path
(`./audio/<id>.wav`), question, choices, answer, modality (sound, music, speech and their mixes), category,
sub-category, language, ...}.

Every record becomes one multiple-choice example of the `test` split that keeps the whole record (`source`) and
its place in the file (`position`), so that the submission file can hold the release's records unchanged and in
order. The prompt is the question, then its choices as the release lists them, lettered as mellow's own
multiple-choice questions are ("Which ...? a) Man b) Woman c) Child"); the expected answer is the choice's text,
which is what the benchmarks' answer-matching rule looks for.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from mellow.files import sha256_file
from mellow.sources.common import ClipCatalog, Imported
from mellow.sources.config import PrepareConfig
from mellow.sources.reasonaqa import read_rows


@dataclass(frozen=True)
class Release:
    """How one benchmark's release file is laid out and how its official script reads predictions."""

    name: str  # mmau, mmar: the --source kind
    title: str  # as its papers write it
    audio_field: str  # the record's audio path, relative to the file's folder
    by_task: str  # the first breakdown: MMAU's task, MMAR's modality
    second: str  # the second breakdown: MMAU's difficulty, MMAR's category
    prediction_key: str  # the key its official evaluation script reads the model's answer from
    example_file: str  # the release file's name, for messages

    @property
    def second_block(self) -> str:
        """The scores.json key of the second breakdown: by_difficulty or by_category."""
        return f"by_{self.second}"


RELEASES = {
    "mmau": Release("mmau", "MMAU", "audio_id", "task", "difficulty", "model_output",
                    "mmau-test-mini.json"),
    "mmar": Release("mmar", "MMAR", "audio_path", "modality", "category", "answer_prediction",
                    "MMAR-meta.json"),
}


REQUIRED = ("question", "choices")


def choices_prompt(question: str, choices: list[str]) -> str:
    """The question and its choices in one prompt: 'Which ...? a) Man b) Woman c) Child'."""
    letters = string.ascii_lowercase
    listed = " ".join(f"{letters[i % 26]}) {choice}" for i, choice in enumerate(choices))
    return f"{question.strip()} {listed}"


def load_release(release: Release, location: str, config: PrepareConfig) -> Imported:
    """The examples of a benchmark's release file: one per record, all in the test split."""
    path = Path(location)
    if path.is_dir():
        raise ValueError(f"--source {release.name}:{location} is a folder; pass the release's JSON file in it, e.g. "
                         f"{release.name}:{path / release.example_file}")
    if not path.is_file():
        raise FileNotFoundError(f"--source {release.name}:{location}: {path} does not exist; pass the release's "
                                f"JSON file, e.g. {release.name}:{release.example_file}")
    records = read_rows(path)
    imported = Imported(read=str(path))
    catalog = ClipCatalog(imported)
    root = config.audio_root or path.parent
    answered = 0
    for position, record in enumerate(records):
        where = f"{path.name} record {position + 1} (id {record.get('id', '?')})"
        problem = _problem(record, release)
        if problem:
            imported.failures.append({"where": where, "reason": problem})
            continue
        relative = str(record[release.audio_field]).replace("\\", "/")
        clip = catalog.clip(root / relative, Path(relative).name, "test", where)
        if clip is None:
            continue
        choices = [str(choice) for choice in record["choices"]]
        withheld = record.get("answer") is None
        answered += not withheld
        imported.add("test", {
            "task": "multiple_choice", "subtask": str(record.get(release.by_task) or "unknown"), "audio1": clip,
            "audio2": None, "prompt": choices_prompt(str(record["question"]), choices),
            "answer": "" if withheld else str(record["answer"]), "options": choices,
            "benchmark": release.name, "position": position, **({"answer_withheld": True} if withheld else {}),
            "source": record})
    imported.details = {"benchmark": {"name": release.name, "file": str(path.absolute()),
                                      "file_sha256": sha256_file(path), "records": len(records),
                                      "with_answers": answered}}
    return imported


def _problem(record: dict, release: Release) -> str | None:
    """Why a record cannot be an example (a field missing or of the wrong type), or None."""
    missing = [key for key in (*REQUIRED, release.audio_field) if record.get(key) in (None, "")]
    if missing:
        return f"no {', '.join(missing)} field"
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
        return f"'choices' must be a list of at least two texts (got {choices!r:.80})"
    return None


def load_mmau(location: str, config: PrepareConfig) -> Imported:
    """`mmau:<file>`: MMAU's mmau-test-mini.json or mmau-test.json."""
    return load_release(RELEASES["mmau"], location, config)


def load_mmar(location: str, config: PrepareConfig) -> Imported:
    """`mmar:<file>`: MMAR's MMAR-meta.json (or .jsonl)."""
    return load_release(RELEASES["mmar"], location, config)
