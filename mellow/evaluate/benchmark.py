"""A public benchmark's protocol (MMAU, MMAR): scores as its official evaluation script computes them, and the
submission file that script (or the benchmark's leaderboard) reads.

- The rule: `answers.matches_choice`, the releases' answer matching (every word of the answer, none of the words
  only other choices have). Only records that have an answer are scored; MMAU's test set withholds its answers,
  so its records are predicted and written to the submission file, not scored.
- The breakdown the official scripts print: total accuracy; by task (MMAU) or modality (MMAR); by difficulty
  (MMAU) or category (MMAR); by sub-category; and here also the share of answers that match no choice.
- The submission file, `<eval folder>/<benchmark>-predictions.json`: the release's records unchanged, in the
  release's order, each with the model's answer under the key the official script reads (`model_output` for
  MMAU, `answer_prediction` for MMAR). A record without audio (missing or undecodable) has no answer there, so the
  official script skips it as mellow's report does.
"""

from __future__ import annotations

import json
from pathlib import Path

from mellow.answers import matched_choice, matches_choice
from mellow.files import sha256_file, write_text_atomic
from mellow.progress import console
from mellow.sources.benchmarks import RELEASES
from mellow.sources.reasonaqa import read_rows


def benchmark_of(dataset: Path) -> dict | None:
    """The benchmark block of a prepared dataset's prepare.json ({name, file, file_sha256, records, ...}), or None
    for a dataset that is not a benchmark release."""
    path = Path(dataset) / "prepare.json"
    if not path.is_file():
        return None
    found = json.loads(path.read_text()).get("benchmark")
    return found if isinstance(found, dict) and found.get("name") in RELEASES else None


def _accuracy(pairs: list[bool]) -> dict:
    return {"accuracy": sum(pairs) / len(pairs), "count": len(pairs)}


def _by(field: str, examples: list[dict], right: list[bool], skip_missing: bool = False) -> dict[str, dict]:
    """{value of the record's `field`: {accuracy, count}}, in order of first appearance (as the scripts print);
    a record without the field counts as 'unknown', or is left out with `skip_missing` (the scripts' rule for
    sub-categories)."""
    groups: dict[str, list[bool]] = {}
    for example, correct in zip(examples, right):
        value = example["source"].get(field)
        if value is None and skip_missing:
            continue
        groups.setdefault(str(value if value is not None else "unknown"), []).append(correct)
    return {value: _accuracy(found) for value, found in groups.items()}


def benchmark_scores(info: dict, examples: list[dict], predictions: list[str]) -> dict:
    """The scores.json `benchmark` block of the predictions for a benchmark's examples (those of the release
    file `info` describes): accuracy (a fraction), by_task, by_difficulty or by_category, by_sub_category and
    no_match over the records with answers; counts of those scored, predicted without an answer (withheld) and
    not predicted at all (no audio in the store, or beyond --max-examples)."""
    release = RELEASES[info["name"]]
    scored = [index for index, example in enumerate(examples) if not example.get("answer_withheld")]
    chosen = [examples[i] for i in scored]
    right = [matches_choice(examples[i]["answer"], predictions[i], examples[i]["options"]) for i in scored]
    no_match = [matched_choice(predictions[i], examples[i]["options"]) is None for i in scored]
    block = {"name": release.title, "file": info.get("file"), "file_sha256": info.get("file_sha256"),
             "accuracy": sum(right) / len(right) if right else None, "scored": len(right),
             "withheld": len(examples) - len(scored),
             "not_predicted": max(int(info.get("records", len(examples))) - len(examples), 0),
             "task_field": release.by_task,
             "by_task": _by(release.by_task, chosen, right),  # MMAU's task, MMAR's modality
             release.second_block: _by(release.second, chosen, right),
             "by_sub_category": _by("sub-category", chosen, right, skip_missing=True),
             "no_match": sum(no_match) / len(no_match) if no_match else None}
    return block


def submission_records(info: dict, examples: list[dict], predictions: list[str]) -> list[dict]:
    """The release's records in its order, each predicted one with the model's answer under the release's
    prediction key. The release file itself when it is still where 00_prepare read it and unchanged; else the
    records the dataset's examples keep (those without audio then missing: said)."""
    release = RELEASES[info["name"]]
    by_position = {example["position"]: prediction for example, prediction in zip(examples, predictions)}
    path = Path(info.get("file") or "")
    if path.is_file() and sha256_file(path) == info.get("file_sha256"):
        records = read_rows(path)
    else:
        console.print(f"[yellow]{release.title}'s release file {path} is not here unchanged; the submission file "
                      "holds the records this dataset kept (those without audio are missing)", highlight=False)
        kept = {example["position"]: example["source"] for example in examples}
        records = [kept[position] for position in sorted(kept)]
        by_position = {new: by_position[old] for new, old in enumerate(sorted(kept))}
    return [{**record, release.prediction_key: by_position[position]} if position in by_position else record
            for position, record in enumerate(records)]


def write_submission(output_dir: Path, info: dict, examples: list[dict], predictions: list[str]) -> Path:
    """`<output_dir>/<benchmark>-predictions.json` (submission_records); returns its path."""
    path = output_dir / f"{info['name']}-predictions.json"
    records = submission_records(info, examples, predictions)
    write_text_atomic(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return path


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def benchmark_markdown(block: dict) -> str:
    """The benchmark block as Markdown: the total, then each breakdown as a table (accuracy in percent, as the
    benchmarks' leaderboards print it)."""
    sha = (block.get("file_sha256") or "")[:12]
    scored = (f"**{_percent(block['accuracy'])}** over {block['scored']} scored record(s); no choice matched: "
              f"{_percent(block['no_match'])}" if block["scored"] else
              "no record has an answer to score here (the release withholds them): submit the submission file to "
              "the benchmark's own evaluation")
    lines = [f"## {block['name']}", "",
             f"Release file `{Path(block.get('file') or '?').name}` (sha256 {sha}…): {scored}"
             + (f"; {block['withheld']} predicted without an answer to score (withheld)" if block["withheld"] else "")
             + (f"; {block['not_predicted']} not predicted (no audio in the store)" if block["not_predicted"] else ""),
             ""]
    for key in ("by_task", "by_difficulty", "by_category", "by_sub_category"):
        if not block.get(key):
            continue
        name = block.get("task_field", "task") if key == "by_task" else key.removeprefix("by_").replace("_", "-")
        lines += [f"| {name} | n | accuracy |", "|---|---|---|"]
        lines += [f"| {value} | {group['count']} | {_percent(group['accuracy'])} |"
                  for value, group in block[key].items()]
        lines.append("")
    return "\n".join(lines)
