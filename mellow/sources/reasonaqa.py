"""`mellow:<json>[,<json>...]`: Mellow / ReasonAQA release files, a JSON list (or JSON lines) of {taskname,
filepath1, filepath2, caption1, caption2, input, answer, subtype}. A file's split comes from its name (train /
val, valid, dev / test) or is given as split=path; audio paths start at --audio-root (default: the file's
folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from random import Random

from mellow.sources.common import SPLIT_NAMES, ClipCatalog, Imported
from mellow.sources.config import PrepareConfig

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
        for number, row in enumerate(read_rows(path), 1):  # data rows count from 1
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


def read_rows(path: Path) -> list[dict]:
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


def load(location: str, config: PrepareConfig) -> Imported:
    """`mellow:<json>[,<json>...]`: Mellow / ReasonAQA release files."""
    return import_mellow(location, config.audio_root, config.seed)
