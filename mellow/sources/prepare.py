"""Stage 00: make a dataset folder (audio files + manifests) from a source.

Sources: `synth`, the built-in synthetic sound scenes (audio written here); `wds:<tars>`, WebDataset tars
of audio + json (the audio stays in the tars; records name tar and member); and the published layouts of
Mellow/ReasonAQA, Clotho, AudioCaps and a folder + CSV/JSONL (`mellow:`, `clotho:`, `audiocaps:`, `folder:`;
mellow/sources/registry.py), whose audio stays where it is (records hold absolute paths).

Layout written under `datasets/<name>/`:
    audio/<id>.<ext>          the audio files (mixed formats, rates and channel counts for `synth`)
    audio.jsonl               one audio record per clip: id, path (relative), duration, sha256, ...
    <split>.jsonl             one example per line: task, subtask, audio1, audio2, prompt, answer, split, ...
    prepare.json              the config that made it and the counts; written last, so it marks completion
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.markup import escape

from mellow.audio.decode import AudioDecodeError, decode_audio, find_ffmpeg
from mellow.audio.identity import file_stat, local_audio_path, recorded_stat, stat_fields
from mellow.config import describe_differences, to_dict
from mellow.files import read_json, read_jsonl, sha256_file, write_json_atomic, write_jsonl_atomic
from mellow.manifests import resolve
from mellow.progress import console, progress_bar
from mellow.sources import registry
from mellow.sources.config import PrepareConfig

MEASURE_RATE = 16000  # the rate a changed file is decoded at to measure its duration


def run(config: PrepareConfig) -> Path:
    """Prepare the dataset (if it is already complete: check that its audio is still what it recorded) and
    return its folder."""
    started = time.time()
    if not config.name and config.source != "synth":
        console.print(f"dataset name {config.dataset_name} (named after the source; --name sets another)",
                      highlight=False)
    if validate_args(config):
        recheck_release(config)
        recheck_audio(config, started)
        return config.dataset_dir
    counts = process(config)
    report(config, counts, time.time() - started)
    return config.dataset_dir


def validate_args(config: PrepareConfig) -> bool:
    """True if the dataset is already complete with this config; an error if it was made with another (unless
    --overwrite, which also rebuilds one made with this config)."""
    find_ffmpeg()
    marker = config.dataset_dir / "prepare.json"
    if not marker.exists():
        return False
    previous = read_json(marker)["config"]
    current = _fingerprint(config)
    if previous == current and not config.overwrite:
        return True
    if previous != current and not config.overwrite:
        differences = "\n  ".join(describe_differences(previous, current))
        raise ValueError(f"{config.dataset_dir} was prepared with another config:\n  {differences}\n"
                         "use another --name, or --overwrite to replace it")
    marker.unlink()
    return False


def recheck_release(config: PrepareConfig) -> None:
    """A benchmark dataset already prepared: its release file must still be the one imported. Releases are revised
    (MMAU's answers were in 2025), and scores of two versions must never be compared unknowingly."""
    recorded = read_json(config.dataset_dir / "prepare.json").get("benchmark")
    if not recorded or not Path(recorded["file"]).is_file():
        return
    now = sha256_file(Path(recorded["file"]))
    if now != recorded["file_sha256"]:
        raise ValueError(f"{recorded['file']} changed since {config.dataset_dir} was prepared from it (sha256 "
                         f"{recorded['file_sha256'][:12]}… then, {now[:12]}… now): it is another version of the "
                         "benchmark, whose scores must not be compared with the old one's. Import it under another "
                         "--name to keep both, or pass --overwrite to replace this one")


def recheck_audio(config: PrepareConfig, started: float) -> None:
    """A dataset already prepared with this config: check that its audio files still hold what audio.jsonl
    records, cheaply (a stat per file; the sha256 only of files whose size or modification time changed), record
    the new sha256 (and duration) of files that changed, so that 01_precompute re-encodes them, and say what
    changed. Audio in tars, Parquet shards or at URLs is identified by its bytes when it is read, not here."""
    path = config.dataset_dir / "audio.jsonl"
    records = read_jsonl(path)
    verdicts = _audio_verdicts(records, config.dataset_dir, config.workers or os.cpu_count() or 1)
    if _record_changes(records, verdicts, config.dataset_dir):
        write_jsonl_atomic(path, records)
    checked = sum(verdict != "unchecked" for verdict, _, _ in verdicts)
    changed, missing = ([record["id"] for record, (verdict, _, _) in zip(records, verdicts) if verdict == kind]
                        for kind in ("changed", "missing"))
    if changed:
        console.print(f"[yellow]dataset {config.dataset_dir} is already prepared with this config, but "
                      f"{len(changed)} of {checked} clips' audio changed since[/]: {escape(', '.join(changed[:10]))}"
                      f"{' …' if len(changed) > 10 else ''}. audio.jsonl now records their new sha256, and "
                      "01_precompute re-encodes them", highlight=False)
    elif checked:
        console.print(f"[green]dataset {config.dataset_dir} is already prepared with this config[/]; the audio of its "
                      f"{checked} clip files is unchanged (checked in {time.time() - started:.1f} s)", highlight=False)
    else:  # audio in tars or Parquet shards: identified by the sha256 of its bytes when read
        console.print(f"[green]dataset {config.dataset_dir} is already prepared with this config; skipping",
                      highlight=False)
    if missing:
        console.print(f"[yellow]{len(missing)} clip(s)' audio files are missing[/]: {escape(', '.join(missing[:10]))}"
                      f"{' …' if len(missing) > 10 else ''} (01_precompute reports them as failed)", highlight=False)


def _audio_verdicts(records: list[dict], root: Path, workers: int) -> list[tuple[str, tuple | None, str | None]]:
    """(verdict, stat now, sha256 now) of every record (_audio_now, then the hash of those it cannot tell:
    touched or changed); a stat per file in one pass, hashes in threads."""
    with progress_bar(transient=True) as progress:
        task = progress.add_task("checking audio", total=len(records))
        verdicts = []
        for start in range(0, len(records), 1000):  # the bar moves per thousand: a stat costs less than a redraw
            verdicts.extend(_audio_now(record, root) for record in records[start : start + 1000])
            progress.advance(task, len(verdicts) - start)
    to_hash = [index for index, (verdict, _, _) in enumerate(verdicts) if verdict == "hash"]
    with ThreadPoolExecutor(workers) as pool:  # hashing releases the GIL
        paths = [Path(resolve(records[index]["path"], root)) for index in to_hash]
        for index, digest in zip(to_hash, pool.map(sha256_file, paths)):
            now = verdicts[index][1]
            verdicts[index] = ("touched" if digest == records[index]["sha256"] else "changed", now, digest)
    return verdicts


def _record_changes(records: list[dict], verdicts: list[tuple], root: Path) -> bool:
    """Write into `records` the new stat of touched and changed files, and the sha256 and duration of changed ones;
    whether any record changed."""
    for record, (verdict, now, digest) in zip(records, verdicts):
        if verdict in ("changed", "touched"):
            record["bytes"], record["mtime_ns"] = now
        if verdict == "changed":
            record["sha256"] = digest
            if "start" not in record:  # a whole file: its duration is the new audio's
                record["duration"] = _measured_duration(Path(resolve(record["path"], root)))
    return any(verdict in ("changed", "touched") for verdict, _, _ in verdicts)


def _audio_now(record: dict, root: Path) -> tuple[str, tuple[int, int] | None, None]:
    """(verdict, stat now, None) of one audio record, from a stat of its file: unchecked (not a local file, or
    no sha256), missing, same, or hash (its size or modification time changed: its sha256 tells whether it was
    only touched — rewritten or copied with the same audio — or changed)."""
    path = local_audio_path(record, root)
    if path is None or not record.get("sha256"):
        return "unchecked", None, None
    now = file_stat(path)
    if now is None:
        return "missing", None, None
    return ("same" if now == recorded_stat(record) else "hash"), now, None


def _measured_duration(path: Path) -> float | None:
    """Seconds of audio in a file, decoded (None if it cannot be: 01_precompute then reports why)."""
    try:
        return round(len(decode_audio(path, MEASURE_RATE)) / MEASURE_RATE, 3)
    except AudioDecodeError:
        return None


def _fingerprint(config: PrepareConfig) -> dict:
    values = {**to_dict(config), "name": config.dataset_name}
    for key in ("workers", "overwrite", "root"):
        values.pop(key)
    if values["audio_root"] is None:  # datasets prepared before the option existed stay valid
        values.pop("audio_root")
    for key in ("meld_text", "label_field", "label_task", "columns"):  # unset: as datasets made before they existed
        if not values[key]:
            values.pop(key)
    return values


def process(config: PrepareConfig) -> dict[str, int]:
    """Read the source (mellow/sources/registry.py) and write the dataset's manifests."""
    kind = registry.kind_of(config.source)
    imported = registry.load(config)
    if kind.audio != "written":
        _check_labels_found(config, imported.label_tasks)
        _report_failures(imported.failures)
    if not imported.records and kind.audio == "contained":
        raise ValueError(f"--source {config.source}: no usable audio in {imported.read}; "
                         + (imported.failures[0]["reason"] if imported.failures else imported.empty))
    if not imported.records:
        raise ValueError(f"--source {config.source}: no audio file found of those its manifests name"
                         + (f" (e.g. {imported.failures[0].get('path', '')}); check --audio-root"
                            if imported.failures else ""))
    if kind.audio == "files":
        _hash_audio_files(config, imported.records)
    return _write_manifests(config, imported.records, imported.examples, imported.failures, imported.label_tasks,
                            imported.details)


def _hash_audio_files(config: PrepareConfig, records: list[dict]) -> None:
    """Record the sha256 and stat of every audio file an imported layout names (a store refuses a clip whose
    file changed)."""
    paths = sorted({record["path"] for record in records})
    with progress_bar() as progress, ThreadPoolExecutor(config.workers or os.cpu_count() or 1) as pool:
        task = progress.add_task("hashing audio files", total=len(paths))
        hashes = {}
        for path, digest in zip(paths, pool.map(lambda path: sha256_file(Path(path)), paths)):
            hashes[path] = digest
            progress.advance(task)
    for record in records:
        record["sha256"] = hashes[record["path"]]
        record.update(stat_fields(record, config.dataset_dir))  # 00_prepare and 01_precompute hash it again only
        # where its size or modification time change


def _check_labels_found(config: PrepareConfig, label_tasks: dict[str, list[str]]) -> None:
    """A --label-field that no clip holds is a mistyped name, not an empty task."""
    for field_name, task in config.label_fields().items():
        if task not in label_tasks:
            raise ValueError(f"--label-field {field_name}: no clip of {config.source} has a label in that field")


def _report_failures(failures: list[dict]) -> None:
    for failure in failures[:10]:
        what = failure.get("path") or failure.get("where") or f"{failure.get('tar')} {failure.get('key') or ''}"
        needed = f" (needed by {failure['rows']} row(s), e.g. {failure['needed_by'][0]})" if "rows" in failure else ""
        console.print(f"  [yellow]skipped[/] {escape(what)}: {escape(failure['reason'])}{escape(needed)}")
    if len(failures) > 10:
        console.print(f"  [yellow]… and {len(failures) - 10} more[/]; all are listed in prepare.json")


def _write_manifests(config: PrepareConfig, records: list[dict], examples: dict[str, list[dict]],
                     failures: list[dict], label_tasks: dict[str, list[str]] | None = None,
                     details: dict | None = None) -> dict[str, int]:
    """audio.jsonl, <split>.jsonl, and prepare.json last (it marks the dataset complete); `label_tasks`
    ({task: labels}) declares the closed-label tasks, whose every answer must be one of its labels; `details`
    (a benchmark's release file and its sha256) go into prepare.json as they are."""
    label_tasks = label_tasks or {}
    for split, rows in examples.items():
        for example in rows:
            labels = label_tasks.get(example["task"])
            if labels is not None and any(label not in labels for label in example.get("references") or
                                          [example["answer"]]):
                raise ValueError(f"a {split} example of the closed-label task {example['task']!r} is labelled "
                                 f"{example['answer']!r}, which is not one of {labels}")
    config.dataset_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(config.dataset_dir / "audio.jsonl", records)
    for split, rows in examples.items():
        write_jsonl_atomic(config.dataset_dir / f"{split}.jsonl", rows)
    counts = {"clips": len(records), **{f"{split}_examples": len(rows) for split, rows in examples.items()},
              **({"skipped": len(failures)} if failures else {})}
    details = details or {}
    if "benchmark" not in details:  # a benchmark is only ever scored: its test split is all it has
        _warn_of_empty_splits(config, examples, len(records))
    write_json_atomic(config.dataset_dir / "prepare.json", {"config": _fingerprint(config), "counts": counts,
                                                            "failures": failures, **details,
                                                            **({"label_tasks": label_tasks} if label_tasks else {})})
    return counts


SPLIT_USES = {"train": "03_train learns from it", "val": "03_train validates on it", "test": "04_eval scores it"}


def _warn_of_empty_splits(config: PrepareConfig, examples: dict[str, list[dict]], clips: int) -> None:
    """A split left without examples (too few clips for the val/test fractions, or a source without it) is
    said, with the counts: a later stage needs it."""
    if not any(examples.values()):
        return
    counts = ", ".join(f"{len(examples.get(split, []))} {split}" for split in SPLIT_USES)
    empty = [split for split in SPLIT_USES if not examples.get(split)]
    if empty:
        which = f"the {' and the '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty"
        console.print(f"[yellow]warning: {which}[/] (examples: {counts}, from {clips} clips at --val-fraction "
                      f"{config.val_fraction:g} and --test-fraction {config.test_fraction:g}, unless the source names "
                      f"the splits); {'; '.join(SPLIT_USES[split] for split in empty)}: add clips, or give them a "
                      "split", highlight=False)


def report(config: PrepareConfig, counts: dict[str, int], seconds: float) -> None:
    summary = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items())
    console.print(f"[bold green]prepared[/] {config.dataset_dir}: {summary} in {seconds:.1f} s")

