"""The evaluation report of a training run: a leaderboard over its scored checkpoints, PNG plots of each task's
score and of the losses against the update, and the newest checkpoint's scores per subtask with chance levels
and confusion tables, as report.md and as report.html (which also lets one listen to a sample of the examples).
Written by 04_eval into `<run>/eval-<split>/`."""

from __future__ import annotations

from pathlib import Path

from mellow.evaluate.benchmark import benchmark_markdown
from mellow.evaluate.html_report import write_html_report
from mellow.evaluate.metrics import main_metric
from mellow.files import read_json, read_jsonl, write_json_atomic, write_text_atomic


def scored_checkpoints(run_dir: Path, split: str) -> list[dict]:
    """[{checkpoint, update, scores, settings}] of every checkpoint of the run scored on `split`, by update."""
    rows = []
    for path in sorted(run_dir.glob(f"step-*/eval-{split}/scores.json")):
        saved = read_json(path)
        update = saved.get("update", int(path.parent.parent.name.removeprefix("step-")))
        rows.append({"checkpoint": path.parent.parent.name, "update": update, "scores": saved["scores"],
                     "settings": saved.get("settings"), "empty_predictions": saved.get("empty_predictions", 0),
                     **({"benchmark": saved["benchmark"]} if "benchmark" in saved else {})})
    return sorted(rows, key=lambda row: row["update"])


def write_run_report(run_dir: Path, split: str, skipped: dict[str, str], failed: dict[str, str],
                     dataset: Path | None = None) -> Path:
    """Write leaderboard.json/.md, report.md, scores.png, loss.png and report.html (with copies of the sampled
    examples' audio from `dataset`, by default the newest scored checkpoint's); returns report.md's path."""
    out = run_dir / f"eval-{split}"
    rows = scored_checkpoints(run_dir, split)
    tasks = sorted({task for row in rows for task in row["scores"] if "/" not in task})
    write_json_atomic(out / "leaderboard.json", [
        {"checkpoint": row["checkpoint"], "update": row["update"],
         **{task: main_metric(row["scores"][task])[1] for task in tasks if task in row["scores"]},
         **({row["benchmark"]["name"]: row["benchmark"]["accuracy"]} if "benchmark" in row else {})} for row in rows])
    leaderboard = leaderboard_markdown(rows, tasks, pointers(run_dir)) + release_versions(rows)
    write_text_atomic(out / "leaderboard.md", f"# Leaderboard of `{run_dir}` on {split}\n\n{leaderboard}")
    plots = plot_scores(rows, tasks, out / "scores.png") + plot_losses(run_dir / "metrics.jsonl", out / "loss.png")
    lines = [f"# Evaluation of `{run_dir}` on the {split} split", ""]
    if rows:
        lines += [f"{len(rows)} checkpoint(s) scored; each task's main score (accuracy, or CIDEr-D for free text), "
                  "the best in bold:", "", leaderboard, ""]
    else:
        lines += ["No checkpoint of this run has been scored on this split yet.", ""]
    lines += [f"![{name}]({name})" for name in plots] + [""]
    replans = read_json(run_dir / "replans.json") if (run_dir / "replans.json").is_file() else []
    if replans:
        lines += ["The run's length was changed on resume (dashed lines in the loss plot):", "",
                  *(f"- at update {record['at']} ({record['checkpoint']}): {record['before']} -> {record['after']} "
                    f"updates, learning rate re-planned by the `{record['rule']}` rule" for record in replans), ""]
    others = sorted(path.name for path in run_dir.glob("eval-*") if path.is_dir() and path.name != out.name)
    if others:
        links = ", ".join(f"[{name}](../{name}/report.md)" for name in others)
        lines += [f"Other evaluations of this run: {links}", ""]
    if rows and "benchmark" in rows[-1]:
        lines += [f"{rows[-1]['checkpoint']}, scored by the benchmark's own protocol "
                  f"(submission file: `{rows[-1]['checkpoint']}/eval-{split}/"
                  f"{rows[-1]['benchmark']['name'].lower()}-predictions.json`):", "",
                  benchmark_markdown(rows[-1]["benchmark"]), ""]
    if rows:
        newest = rows[-1]
        lines += [f"## {newest['checkpoint']} (update {newest['update']}) per task and subtask", "",
                  detail_markdown(newest["scores"]), ""]
        labelled = {task: values for task, values in newest["scores"].items() if "per_class" in values}
        if labelled:
            lines += ["## Closed-label tasks", "", classification_markdown(labelled), ""]
            for task, values in labelled.items():
                if "/" not in task:
                    lines += [f"**{task}** per class", "", per_class_markdown(values["per_class"]), ""]
                    lines += [f"![{name}]({name})" for name in plot_confusion(
                        values["confusion"], f"{task}: {newest['checkpoint']}", out / f"confusion-{task}.png")]
                    lines += [""]
        confusions = {task: values["confusion"] for task, values in newest["scores"].items() if "confusion" in values}
        if confusions:
            lines += ["## Confusion tables (rows: expected answer, columns: predicted)", ""]
            for task, table in confusions.items():
                lines += [f"**{task}**", "", confusion_markdown(table), ""]
    notes = [*skipped.values(), *(f"{name} could not be scored: {why}" for name, why in failed.items()),
             *(f"{row['checkpoint']}: {row['empty_predictions']} empty prediction(s)" for row in rows
               if row["empty_predictions"])]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    newest_folder = run_dir / rows[-1]["checkpoint"] if rows else None
    if newest_folder is not None and dataset is None and (newest_folder / "trainer.json").is_file():
        dataset = Path(read_json(newest_folder / "trainer.json")["config"]["train"]["dataset"])
    write_html_report(out, f"{run_dir.name}: {split}", "\n".join(lines),
                      newest_folder / f"eval-{split}" / "predictions.jsonl" if newest_folder else None, dataset)
    return out / "report.md"


def release_versions(rows: list[dict]) -> str:
    """A warning under a leaderboard whose checkpoints were scored on different versions of a benchmark's release
    file (their scores are not comparable), naming each version's checkpoints; "" otherwise."""
    versions: dict[str, list[str]] = {}
    for row in rows:
        if "benchmark" in row:
            versions.setdefault(row["benchmark"].get("file_sha256") or "?", []).append(row["checkpoint"])
    if len(versions) < 2:
        return ""
    listed = "; ".join(f"sha256 {sha[:12]}…: {', '.join(names)}" for sha, names in versions.items())
    return (f"\n\n**Not comparable:** these checkpoints were scored on {len(versions)} versions of the release file "
            f"({listed}); score them again on one (`04_eval --rescore`).")


def pointers(run_dir: Path) -> dict[str, str]:
    """{checkpoint folder name: 'latest' / 'best' / 'latest, best'} from the run's pointer files."""
    marks: dict[str, list[str]] = {}
    for which in ("latest", "best"):
        if (run_dir / f"{which}.json").exists():
            marks.setdefault(read_json(run_dir / f"{which}.json")["path"], []).append(which)
    return {name: ", ".join(found) for name, found in marks.items()}


def leaderboard_markdown(rows: list[dict], tasks: list[str], marks: dict[str, str]) -> str:
    best = {task: max((main_metric(row["scores"][task])[1] for row in rows if task in row["scores"]), default=None)
            for task in tasks}
    header = ["checkpoint", "update", *(f"{task} ({main_metric(rows[0]['scores'][task])[0]})" if task in
                                        rows[0]["scores"] else task for task in tasks)] if rows else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["checkpoint"] + (f" ({marks[row['checkpoint']]})" if row["checkpoint"] in marks else ""),
                 str(row["update"])]
        for task in tasks:
            if task not in row["scores"]:
                cells.append("")
                continue
            value = main_metric(row["scores"][task])[1]
            cells.append(f"**{value:.3f}**" if value == best[task] else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_markdown(scores: dict[str, dict]) -> str:
    caption_columns = sorted({key for values in scores.values() if "accuracy" not in values for key in values
                              if key != "count"})
    lines = ["| task | n | accuracy | chance | " + " | ".join(caption_columns) + " |",
             "|" + "---|" * (4 + len(caption_columns))]
    for name, values in scores.items():
        if "accuracy" in values:
            cells = [f"{values['accuracy']:.3f}", f"{values['chance']:.3f}", *[""] * len(caption_columns)]
        else:
            cells = ["", "", *(f"{values[key]:.3f}" if key in values else "" for key in caption_columns)]
        lines.append(f"| {name} | {values['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classification_markdown(scores: dict[str, dict]) -> str:
    """One row per closed-label task (and subtask): the figures emotion and sentiment papers report."""
    lines = ["| task | n | accuracy | UAR | macro-F1 | weighted-F1 | outside the label set | chance |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {task} | {values['count']} | " + " | ".join(f"{values[key]:.3f}" for key in (
        "accuracy", "uar", "macro_f1", "weighted_f1", "outside_label_set", "chance")) + " |"
        for task, values in scores.items()]
    return "\n".join(lines)


def per_class_markdown(per_class: dict[str, dict]) -> str:
    lines = ["| label | support | precision | recall | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {values['support']} | {values['precision']:.3f} | {values['recall']:.3f} | "
              f"{values['f1']:.3f} |" for label, values in per_class.items()]
    return "\n".join(lines)


def confusion_markdown(table: dict[str, dict[str, int]]) -> str:
    columns = list(next(iter(table.values())))  # the label order, answers outside the set last
    lines = ["| expected \\ predicted | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {expected} | " + " | ".join(str(counts[c]) for c in columns) + " |"
              for expected, counts in table.items()]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_scores(rows: list[dict], tasks: list[str], path: Path) -> list[str]:
    """One panel per task: its main score against the update, with the chance level where there is one."""
    if not rows or not tasks:
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        points = [(row["update"], row["scores"][task]) for row in rows if task in row["scores"]]
        metric = main_metric(points[0][1])[0]
        axis.plot([u for u, _ in points], [main_metric(v)[1] for _, v in points], marker="o")
        if "chance" in points[0][1]:
            axis.axhline(points[-1][1]["chance"], linestyle="--", color="grey", label="chance")
            axis.legend(loc="lower right", fontsize=8)
        axis.set_title(task, fontsize=10)
        axis.set_xlabel("update")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path.name]


def plot_confusion(table: dict[str, dict[str, int]], title: str, path: Path) -> list[str]:
    """The confusion matrix as a picture: rows the expected label, columns the predicted one (answers outside
    the label set last), each cell's count written in it, shaded by the share of its row."""
    plt = _pyplot()
    rows, columns = list(table), list(next(iter(table.values())))
    counts = [[table[row][column] for column in columns] for row in rows]
    shares = [[count / max(sum(line), 1) for count in line] for line in counts]
    figure, axis = plt.subplots(figsize=(1.0 + 0.7 * len(columns), 1.2 + 0.55 * len(rows)))
    axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for i, line in enumerate(counts):
        for j, count in enumerate(line):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=8,
                      color="white" if shares[i][j] > 0.6 else "black")
    axis.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("expected")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path.name]


def plot_losses(metrics_path: Path, path: Path) -> list[str]:
    """Training loss (logged windows) and validation loss against the update, from the run's metrics.jsonl."""
    if not metrics_path.exists():
        return []
    logged = read_jsonl(metrics_path)
    training = [(row["update"], row["loss"]) for row in logged if "loss" in row]
    validation = [(row["update"], row["val_loss"]) for row in logged if "val_loss" in row]
    if not training and not validation:
        return []
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for points, label in ((training, "training loss"), (validation, "validation loss")):
        if points:
            axis.plot([u for u, _ in points], [v for _, v in points], label=label,
                      marker="o" if label.startswith("validation") else None)
    replans = metrics_path.parent / "replans.json"
    for number, record in enumerate(read_json(replans) if replans.is_file() else []):
        axis.axvline(record["at"], color="grey", linestyle="--", linewidth=1,
                     label="length re-planned" if number == 0 else None)
    axis.set_yscale("log")
    axis.set_xlabel("update")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path.name]


ALIGN_FIGURES = ("audio_to_text_R@1", "text_to_audio_R@1", "audio_to_text_mAP@10")


LABEL_FIGURES = ("accuracy", "uar", "macro_f1", "weighted_f1")


def stage_rows(runs: list[Path], tag: str) -> list[dict]:
    """One row per stage of a chain (an align run, training runs scored by 04_eval): its kind and figures. A
    training run gives its newest scored checkpoint's main score per task, and every classification figure of
    its closed-label tasks; an align run its retrieval figures on its eval split."""
    rows = []
    for run in runs:
        if (run / "align.json").is_file():
            align = read_json(run / "align.json")
            split, retrieval = next(iter(align["retrieval"].items()))
            rows.append({"run": str(run), "stage": "align", "split": split,
                         "figures": {f"retrieval {key}": retrieval[key] for key in ALIGN_FIGURES}})
            continue
        scored = scored_checkpoints(run, tag)
        if not scored:
            raise FileNotFoundError(f"{run}: neither an align run (align.json) nor a training run scored on {tag} "
                                    f"(<run>/step-*/eval-{tag}/scores.json); run 04_eval on it first")
        newest = scored[-1]
        figures = {}
        for task, values in newest["scores"].items():
            if "/" in task:
                continue
            keys = [key for key in LABEL_FIGURES if key in values] if "per_class" in values else [
                main_metric(values)[0]]
            figures.update({f"{task} {key}": values[key] for key in keys})
        rows.append({"run": str(run), "stage": "train", "split": tag, "checkpoint": newest["checkpoint"],
                     "update": newest["update"], "figures": figures})
    return rows


def write_chain_leaderboard(runs: list[Path], tag: str, output: Path) -> list[dict]:
    """stage_rows of `runs` as <output>.json and <output>.md (one table: a row per stage, a column per figure)."""
    rows = stage_rows(runs, tag)
    columns = list(dict.fromkeys(key for row in rows for key in row["figures"]))
    lines = [f"# Leaderboard of {len(rows)} stage(s) ({tag})", "",
             "| stage | run | checkpoint | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for row in rows:
        cells = [f"{row['figures'][key]:.3f}" if key in row["figures"] else "" for key in columns]
        lines.append(f"| {row['stage']} | {row['run']} | {row.get('checkpoint', '')} | " + " | ".join(cells) + " |")
    write_json_atomic(output.with_suffix(".json"), rows)
    write_text_atomic(output.with_suffix(".md"), "\n".join(lines) + "\n")
    return rows

