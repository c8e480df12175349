"""`<run>/eval-<split>/report.html`: the run's report (report.md rendered: leaderboard, plots, per-task tables)
and a browsable sample of the newest checkpoint's examples, each with its audio to play, prompt, answer,
references and score, filtered by task, subtask and right/wrong.

The page opens from disk: one file with its style and script inline, and relative links only (the PNG plots
beside it and `audio/<name>.mp3`, short compressed copies of the clips that ffmpeg makes at eval time). Every
text from the data is escaped: the page shows a prediction or a caption, it never runs one."""

from __future__ import annotations

import hashlib
import html
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from random import Random

from mellow.files import read_jsonl, write_text_atomic

EXAMPLES_PER_SUBTASK = 8  # the sample of each task/subtask shown on the page


PREVIEW_SECONDS = 10.0  # the longest stretch of a clip copied for listening


PREVIEW_RATE = 22050


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; margin: 0.4em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
#filters { position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ccc; }
#filters label { margin-right: 1.2em; }
#examples td.text { max-width: 28em; white-space: pre-wrap; }
tr.right td.outcome { color: #176c2a; } tr.wrong td.outcome { color: #b3261e; }
audio { width: 15em; height: 2.2em; display: block; }
"""


SCRIPT = """
const filters = Array.from(document.querySelectorAll('#filters select'));
function applyFilters() {
  let shown = 0;
  for (const row of document.querySelectorAll('#examples tbody tr')) {
    const keep = filters.every(select => !select.value || row.dataset[select.name] === select.value);
    row.hidden = !keep;
    if (keep) shown += 1;
  }
  document.getElementById('shown').textContent = String(shown);
}
filters.forEach(select => select.addEventListener('change', applyFilters));
applyFilters();
"""


def markdown_to_html(text: str) -> str:
    """The Markdown report.md is written in (headings, tables, images, lists, paragraphs, **bold**, `code`)."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("|"):
            table = []
            while index < len(lines) and lines[index].startswith("|"):
                table.append(lines[index])
                index += 1
            blocks.append(_table(table))
            continue
        if line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(f"<li>{_inline(lines[index][2:])}</li>")
                index += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        heading = re.match(r"(#{1,3}) (.*)", line)
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if heading:
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            blocks.append(f'<img alt="{html.escape(image.group(1))}" src="{html.escape(image.group(2))}">')
        elif line.strip():
            blocks.append(f"<p>{_inline(line)}</p>")
        index += 1
    return "\n".join(blocks)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _table(lines: list[str]) -> str:
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in lines if not re.fullmatch(r"\|(\s*-+\s*\|)+", line.strip())]
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def example_sample(rows: list[dict], per_subtask: int = EXAMPLES_PER_SUBTASK) -> list[dict]:
    """Up to `per_subtask` rows of each task/subtask, drawn with a fixed seed (the same page on every rerun),
    in task, subtask order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row.get("subtask") or row["task"]), []).append(row)
    sample = []
    for key in sorted(groups):
        group = groups[key]
        sample += [group[i] for i in sorted(Random(f"{key}").sample(range(len(group)), min(per_subtask,
                                                                                              len(group))))]
    return sample


def preview_name(clip_id: str) -> str:
    return f"audio/{hashlib.sha256(clip_id.encode()).hexdigest()[:16]}.mp3"


def make_previews(dataset: Path | None, clip_ids: set[str], out: Path) -> dict[str, str]:
    """{clip id: a reason it has no preview} after writing `audio/<name>.mp3` for each clip that lacks one: its
    first PREVIEW_SECONDS (from the clip's start), mono, as MP3. A clip that cannot be read is reported, not
    fatal: the page says why it has no audio."""
    from mellow.audio.decode import decode_audio, encode_audio_file
    from mellow.audio.sources import sources_of
    from mellow.manifests import read_audio_records

    missing = {clip for clip in clip_ids if not (out / preview_name(clip)).is_file()}
    if not missing:
        return {}
    if dataset is None or not (dataset / "audio.jsonl").is_file():
        return {clip: "the dataset's audio.jsonl is not found" for clip in missing}
    records = [record for record in read_audio_records(dataset) if record["id"] in missing]
    problems = {clip: "not in the dataset's audio.jsonl" for clip in missing - {r["id"] for r in records}}
    (out / "audio").mkdir(parents=True, exist_ok=True)

    def preview(item) -> tuple[str, str | None]:
        _, record, source = item
        if isinstance(source, Exception):
            return record["id"], str(source)
        try:
            seconds = min(record.get("duration") or PREVIEW_SECONDS, PREVIEW_SECONDS)
            waveform = decode_audio(source, PREVIEW_RATE, record.get("start"), seconds, name=record["path"])
            encode_audio_file(waveform, PREVIEW_RATE, out / preview_name(record["id"]), bitrate="48k")
        except Exception as error:  # noqa: BLE001 - one unreadable clip leaves its row without audio
            return record["id"], f"{type(error).__name__}: {error}"
        return record["id"], None

    with ThreadPoolExecutor(4) as pool:
        for clip, problem in pool.map(preview, sources_of(records, dataset)):
            if problem:
                problems[clip] = problem
    return problems


def _audio_cell(clip: str | None, problems: dict[str, str]) -> str:
    if not clip:
        return ""
    label = f"<div>{html.escape(clip)}</div>"
    if clip in problems:
        return label + f"<div><i>no audio: {html.escape(problems[clip])}</i></div>"
    return label + f'<audio controls preload="none" src="{html.escape(preview_name(clip))}"></audio>'


def _outcome(row: dict) -> tuple[str, str]:
    """(filter value, what the score cell shows) of one prediction."""
    if "correct" in row:
        return ("right", "right") if row["correct"] else ("wrong", "wrong")
    if "cider_d" in row:
        return "free text", f"CIDEr-D {row['cider_d']:.3f}"
    return "free text", ""


def examples_html(sample: list[dict], problems: dict[str, str], checkpoint: str, total: int) -> str:
    tasks = sorted({row["task"] for row in sample})
    subtasks = sorted({row.get("subtask") or row["task"] for row in sample})
    outcomes = [value for value in ("right", "wrong", "free text") if any(_outcome(r)[0] == value for r in sample)]

    def select(name: str, values: list[str]) -> str:
        options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
        return f'<label>{name} <select name="{name}"><option value="">all</option>{options}</select></label>'

    rows = []
    for row in sample:
        outcome, shown = _outcome(row)
        references = row.get("references") or [row["answer"]]
        rows.append(
            f'<tr class="{"right" if outcome == "right" else "wrong" if outcome == "wrong" else "free"}" '
            f'data-task="{html.escape(row["task"])}" '
            f'data-subtask="{html.escape(row.get("subtask") or row["task"])}" data-outcome="{outcome}">'
            f"<td>{_audio_cell(row['audio1'], problems)}{_audio_cell(row.get('audio2'), problems)}</td>"
            f"<td>{html.escape(row['task'])}<br><small>{html.escape(row.get('subtask') or '')}</small></td>"
            f'<td class="text">{html.escape(row["prompt"])}</td>'
            f'<td class="text">{html.escape(row["prediction"]) or "<i>(empty)</i>"}</td>'
            f'<td class="text">{"<br>".join(html.escape(str(text)) for text in references)}</td>'
            f'<td class="outcome">{html.escape(shown)}</td></tr>')
    return (f"<h2>Examples of {html.escape(checkpoint)}</h2>"
            f"<p>A sample of {len(sample)} of the {total} scored examples: up to {EXAMPLES_PER_SUBTASK} per task and "
            f"subtask, the first {PREVIEW_SECONDS:g} s of each clip.</p>"
            f'<div id="filters">{select("task", tasks)}{select("subtask", subtasks)}{select("outcome", outcomes)}'
            f'<span><b id="shown">{len(sample)}</b> shown</span></div>'
            '<table id="examples"><thead><tr><th>audio</th><th>task</th><th>prompt</th><th>prediction</th>'
            f'<th>answer / references</th><th>score</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def write_html_report(out: Path, title: str, report_markdown: str, predictions: Path | None,
                      dataset: Path | None) -> Path:
    """Write `out/report.html` (and the audio copies it plays); returns its path."""
    body = markdown_to_html(report_markdown)
    if predictions is not None and predictions.is_file():
        rows = read_jsonl(predictions)
        sample = example_sample(rows)
        clips = {clip for row in sample for clip in (row["audio1"], row.get("audio2")) if clip}
        body += "\n" + examples_html(sample, make_previews(dataset, clips, out), predictions.parent.parent.name,
                                     len(rows))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")
    write_text_atomic(out / "report.html", page)
    return out / "report.html"

