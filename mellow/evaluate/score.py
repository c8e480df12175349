"""Stage 04: generate answers for a split from the store (never the raw audio) and score them, for every
checkpoint of a run that is not scored yet.

Per checkpoint (`<run>/step-NNNNNN/eval-<split>/`):
    predictions.jsonl   one line per example: the example, the prediction, correct (closed tasks) or its own
                        CIDEr-D (free text)
    scores.json         the settings, and per task and task/subtask: accuracy with chance level and a confusion
                        table (binary tasks), or caption metrics
    summary.md          the same as a Markdown table
Per run (`<run>/eval-<split>/`), over every scored checkpoint:
    leaderboard.json, leaderboard.md   each task's main score per checkpoint
    report.md, scores.png, loss.png    the report: leaderboard, scores and losses vs update, the latest
                                       checkpoint per subtask with chance levels, confusion tables
    report.html, audio/                the same report as a page that opens from disk, with a sample of the
                                       newest checkpoint's examples to listen to and filter

A checkpoint that cannot be loaded is reported and skipped; the others are scored, and the command ends with
exit code 2 naming it.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from mellow import answers
from mellow.config import describe_differences
from mellow.distributed import resolve_device
from mellow.evaluate import benchmark, metrics
from mellow.files import read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from mellow.manifests import ManifestError, label_tasks_of
from mellow.progress import console, progress_bar
from mellow.settings import EvalConfig
from mellow.store.reader import EmbeddingStore, dataset_of
from mellow.store.writer import StoreConfig, StoreMismatchError
from mellow.train.checkpoint import load_trained_model
from mellow.train.data import ExampleSet, RowsFromZarr, SplitNotFoundError, move_to, split_path
from mellow.train.runs import find_checkpoint


class EvalFailures(ValueError):
    """Some checkpoints of a run could not be scored (the others were)."""


@dataclass
class EvalResult:
    output_dir: Path  # the eval folder of the newest checkpoint scored (or found scored)
    scores: dict[str, dict]
    examples: int
    seconds: float
    scored: list[Path] = field(default_factory=list)
    already_scored: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # checkpoint -> why
    report: Path | None = None
    dataset: Path | None = None  # the dataset whose split was scored (None: nothing was scored this time)


def run(config: EvalConfig) -> EvalResult:
    """Score the checkpoints `config` names, then (for a run folder) write its leaderboard and report."""
    started = time.time()
    is_run = not (config.run / "trainer.json").exists()
    checkpoints = checkpoints_to_score(config)
    scorer = metrics.CaptionScorer(similarity=config.similarity)
    try:
        return _score_all(config, checkpoints, scorer, is_run, started)
    finally:
        scorer.close()


def _score_all(config: EvalConfig, checkpoints: list[Path], scorer: metrics.CaptionScorer, is_run: bool,
               started: float) -> EvalResult:
    from mellow.evaluate import run_report

    for line in scorer.skipped.values():
        console.print(f"[yellow]{line}", highlight=False)
    result = EvalResult(config.run, {}, 0, 0.0)
    tag = eval_tag(config, checkpoints[-1])
    release = (benchmark.benchmark_of(config.dataset) or {}).get("file_sha256") if config.dataset else None
    for checkpoint in checkpoints:
        output_dir = checkpoint / f"eval-{tag}"
        existing = read_json(output_dir / "scores.json") if (output_dir / "scores.json").exists() else {}
        same_release = (existing.get("benchmark") or {}).get("file_sha256") == release  # a re-imported benchmark
        if existing.get("settings") == config.settings() and same_release and not config.rescore:
            result.already_scored.append(checkpoint)
            result.output_dir, result.scores = output_dir, existing["scores"]
            continue
        try:
            scores, count, dataset = score_checkpoint(checkpoint, config, scorer, tag)
        except (StoreMismatchError, SplitNotFoundError, ManifestError, FileNotFoundError):
            raise  # the store or the dataset (a checkpoint's own missing files are a ValueError), the same for all
        except Exception as error:  # noqa: BLE001 - one broken checkpoint must not stop the others
            if not is_run or config.which != "all":
                raise
            result.failed[checkpoint.name] = f"{type(error).__name__}: {error}"
            console.print(f"[bold red]cannot score {checkpoint}:[/] {error}", highlight=False)
            continue
        result.scored.append(checkpoint)
        result.output_dir, result.scores, result.examples, result.dataset = output_dir, scores, count, dataset
    if is_run:
        result.report = run_report.write_run_report(config.run, tag, scorer.skipped, result.failed,
                                                    config.dataset or result.dataset)
    result.seconds = time.time() - started
    report(result)
    if result.failed:
        raise EvalFailures(f"{len(result.failed)} of {len(checkpoints)} checkpoint(s) could not be scored: "
                           + "; ".join(f"{name}: {why}" for name, why in result.failed.items()))
    return result


def checkpoints_to_score(config: EvalConfig) -> list[Path]:
    """The checkpoint folders `config` names, oldest first."""
    if (config.run / "trainer.json").exists() or config.which != "all":
        return [find_checkpoint(config.run, config.which)]
    found = sorted(path for path in config.run.glob("step-*") if path.is_dir() and ".tmp" not in path.name)
    if not found:
        raise FileNotFoundError(f"{config.run} holds no checkpoints (step-* folders); train first")
    return found


def eval_tag(config: EvalConfig, checkpoint: Path) -> str:
    """The eval folders' suffix: the split (and -rank), after the dataset's name when --dataset names another
    dataset than the one the checkpoint was trained on (eval-mmau-test-mini-test beside eval-test)."""
    trainer = checkpoint / "trainer.json"
    if config.dataset is None or not trainer.is_file() or not scores_another_dataset(config, read_json(trainer)):
        return config.tag
    return f"{config.dataset.name}-{config.tag}"


def scores_another_dataset(config: EvalConfig, trainer: dict) -> bool:
    """Whether --dataset names another dataset than the one the checkpoint (its trainer.json) was trained on."""
    trained = trainer["config"]["train"].get("dataset")
    return config.dataset is not None and not (trained and Path(trained).name == config.dataset.name)


def score_checkpoint(checkpoint: Path, config: EvalConfig, scorer: metrics.CaptionScorer,
                     tag: str | None = None) -> tuple[dict, int, Path]:
    """Generate and score one checkpoint; writes its eval folder (eval-<tag>, by default eval_tag's). Returns
    (scores, examples scored, the dataset whose split it scored)."""
    tag = tag or eval_tag(config, checkpoint)
    started = time.time()
    store, dataset = inputs_of(checkpoint, config)
    device = torch.device(resolve_device(config.device))
    try:
        model, tokenizer, trainer = load_trained_model(checkpoint, device)
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{checkpoint} cannot be loaded ({type(error).__name__}: {error}); the file is damaged "
                         "or incomplete: delete this checkpoint folder, or train again from an earlier one") from None
    # rows read per batch from the shard files: a test split needs a sliver of a store of a million clips
    example_set = ExampleSet.from_split(dataset, config.split, store, tokenizer, max_text_tokens=256,
                                        rows=RowsFromZarr(store), prompt_suffix=model.prompt_suffix,
                                        limit=config.max_examples)
    if not len(example_set):
        raise ValueError(f"split {config.split!r} of {dataset} has no examples whose audio is in the store")
    label_tasks = label_tasks_of(dataset)
    options = [closed_options(example, label_tasks) for example in example_set.examples]
    ranked = [index for index, allowed in enumerate(options) if allowed and config.closed == "rank"]
    predictions = generate_all(model, tokenizer, example_set, config, device,
                               sorted(set(range(len(example_set))) - set(ranked)))
    if ranked:
        for index, answer in zip(ranked, rank_options(model, [example_set.examples[i] for i in ranked],
                                                      [options[i] for i in ranked], store, tokenizer,
                                                      example_set.rows, config, device)):
            predictions[index] = answer
    empty = sum(not prediction.strip() for prediction in predictions)
    if empty:
        console.print(f"[yellow]{checkpoint.name}: {empty} of {len(predictions)} predictions are empty (the model "
                      "ended its answer at once); they count as wrong, and as the word 'empty' for captions")
    seconds = time.time() - started
    output_dir = checkpoint / f"eval-{tag}"
    details = {"settings": config.settings(), "update": trainer["update"], "empty_predictions": empty,
               "seconds": round(seconds, 1), "examples_per_s": round(len(predictions) / seconds, 2)}
    info = benchmark.benchmark_of(dataset)
    if info is not None:
        details["benchmark"] = benchmark.benchmark_scores(info, example_set.examples, predictions)
        submission = benchmark.write_submission(output_dir, info, example_set.examples, predictions)
        console.print(f"{details['benchmark']['name']}: submission file {submission}", highlight=False)
    scores = write_outputs(output_dir, example_set.examples, predictions, checkpoint, scorer, details, label_tasks)
    console.print(f"{checkpoint.name} (update {trainer['update']}): {len(predictions)} examples in {seconds:.1f} s",
                  highlight=False)
    return scores, len(predictions), dataset


def inputs_of(checkpoint: Path, config: EvalConfig) -> tuple[EmbeddingStore, Path]:
    """The store (checked against the checkpoint's fingerprint) and the dataset whose split to score: --dataset,
    else the one the checkpoint was trained on when it scores that store and the folder is here, else the one the
    store was made from (its meta.json names it; said)."""
    trainer_path = checkpoint / "trainer.json"
    if not trainer_path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no trainer.json)")
    trainer = read_json(trainer_path)
    trained_store = Path(trainer["store"])
    if config.store is None and scores_another_dataset(config, trainer):
        store = EmbeddingStore(matching_store(config.dataset, trainer["store_fingerprint"], trained_store, checkpoint))
    else:
        if config.store is None and not trained_store.exists():
            raise FileNotFoundError(f"{checkpoint} was trained with --store {trained_store}, which is not found from "
                                    f"{Path.cwd()}; pass --store <where it is now>")
        store = EmbeddingStore(config.store or trained_store)
    store.check_fingerprint(trainer["store_fingerprint"], f"checkpoint {checkpoint}")
    dataset = config.dataset
    trained_dataset = trainer["config"]["train"].get("dataset")
    if dataset is None and config.store is None and trained_dataset and Path(trained_dataset).exists():
        dataset = Path(trained_dataset)
    if dataset is None:
        dataset = dataset_of(store.path, "--dataset")
        console.print(f"dataset {dataset} (from the store's meta.json; --dataset sets another)", highlight=False)
    split_path(dataset, config.split)  # a missing split is named before any model is loaded
    return store, dataset


def matching_store(dataset: Path, fingerprint: dict, trained_store: Path, checkpoint: Path) -> Path:
    """The store of `dataset` made with the encoder settings `fingerprint` records: under the store root, or beside
    the checkpoint's training store (<root>/<dataset name>/<encoder tag>). None there is an error that lists the
    stores found with what differs, and gives the command that makes a matching one."""
    roots = dict.fromkeys([StoreConfig().root, trained_store.parent.parent])
    found = sorted({path.parent for root in roots for path in (root / dataset.name).glob("*/meta.json")})
    differences = {}
    for path in found:
        recorded = read_json(path / "meta.json").get("fingerprint") or {}
        if recorded.get("kind") == "text":  # a caption store of the same dataset
            continue
        differences[path] = describe_differences(fingerprint, recorded)
        if not differences[path]:
            return path
    seen = "".join(f"\n  {path}: " + "; ".join(lines) for path, lines in differences.items())
    raise FileNotFoundError(
        f"no store of {dataset} was made with the encoder settings of {checkpoint}"
        + (f"; the stores found differ:{seen}\n" if seen else f" (none under {', '.join(map(str, roots))}); ")
        + f"make one with: uv run stages/01_precompute.py {dataset} --like {checkpoint}"
        + (f" --store-root {trained_store.parent.parent}" if trained_store.parent.parent != StoreConfig().root else "")
        + " (or pass --store)")


def generate_all(model, tokenizer, example_set: ExampleSet, config: EvalConfig, device: torch.device,
                 indices: list[int]) -> list[str]:
    """Answers for the examples at `indices` (greedy or beam search; the others stay ""), batched; examples are
    sorted by prompt length to limit padding."""
    prompt_lengths = np.diff(example_set.tokenized.prompt_offsets)
    order = sorted(indices, key=lambda i: prompt_lengths[i])
    predictions = [""] * len(example_set)
    with progress_bar() as progress:
        task = progress.add_task("generating", total=len(order))
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            batch = move_to(example_set.batch(indices, for_generation=True), device)
            outputs = model.generate(batch, config.max_new_tokens, tokenizer.eos_token_id, num_beams=config.beams)
            for index, tokens in zip(indices, outputs):
                predictions[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            progress.advance(task, len(indices))
    return predictions


def closed_options(example: dict, label_tasks: dict[str, list[str]]) -> list[str] | None:
    """The answers a closed question allows (its labels, options, yes/no, first/second), or None for free text."""
    if example["task"] in label_tasks:
        return label_tasks[example["task"]]
    if example["task"] == "multiple_choice":
        return example["options"]
    return {"yes_no": ["yes", "no"], "comparison": ["first", "second"]}.get(example["task"])


def rank_options(model, examples: list[dict], options: list[list[str]], store: EmbeddingStore, tokenizer,
                 rows: RowsFromZarr, config: EvalConfig, device: torch.device) -> list[str]:
    """For each example, the allowed answer with the highest log-likelihood given its audio and prompt (the
    whole answer and its end of text, unnormalised, as lm-evaluation-harness's `acc`)."""
    pairs = [{**example, "answer": option} for example, allowed in zip(examples, options) for option in allowed]
    candidates = ExampleSet(pairs, store, tokenizer, 256, rows=rows, prompt_suffix=model.prompt_suffix)
    assert len(candidates) == len(pairs), "every example's audio is in the store (the eval set holds only those)"
    likelihoods = []
    with progress_bar() as progress:
        task = progress.add_task("ranking answers", total=len(pairs))
        for start in range(0, len(pairs), config.batch_size):
            indices = list(range(start, min(start + config.batch_size, len(pairs))))
            likelihoods.extend(model.answer_log_likelihood(move_to(candidates.batch(indices), device)).tolist())
            progress.advance(task, len(indices))
    chosen, start = [], 0
    for allowed in options:
        scores = likelihoods[start : start + len(allowed)]
        chosen.append(allowed[scores.index(max(scores))])
        start += len(allowed)
    return chosen


def write_outputs(output_dir: Path, examples: list[dict], predictions: list[str], checkpoint: Path,
                  scorer: metrics.CaptionScorer, details: dict, label_tasks: dict[str, list[str]]) -> dict:
    """predictions.jsonl, scores.json and summary.md; an example whose answer is withheld (MMAU's test set) is
    predicted, not scored."""
    scored = [index for index, example in enumerate(examples) if not example.get("answer_withheld")]
    example_cider: dict[int, float] = {}
    scores = metrics.score([examples[i] for i in scored], [predictions[i] for i in scored], scorer, label_tasks,
                           example_cider) if scored else {}
    example_cider = {scored[position]: value for position, value in example_cider.items()}
    rows = [{**example, "prediction": prediction,
             **({"correct": answers.is_correct(example, prediction, label_tasks.get(example["task"]))}
                if (example["task"] in answers.CLOSED_TASKS or example["task"] in label_tasks)
                and not example.get("answer_withheld") else {}),
             **({"cider_d": round(example_cider[index], 4)} if index in example_cider else {})}
            for index, (example, prediction) in enumerate(zip(examples, predictions))]
    write_jsonl_atomic(output_dir / "predictions.jsonl", rows)
    write_json_atomic(output_dir / "scores.json", {"checkpoint": str(checkpoint), **details, "scores": scores})
    summary = markdown_summary(scores, checkpoint)
    if "benchmark" in details:
        summary += "\n" + benchmark.benchmark_markdown(details["benchmark"])
    write_text_atomic(output_dir / "summary.md", summary)
    return scores


def _main_metric(values: dict) -> tuple[str, float, float | None]:
    """(display name, value, chance level or None) of a task's main score."""
    metric, value = metrics.main_metric(values)
    return "CIDEr-D" if metric == "cider_d" else metric, value, values.get("chance")


def markdown_summary(scores: dict[str, dict], checkpoint: Path) -> str:
    if not scores:
        return f"# Scores of `{checkpoint}`\n\nNo example of this split has an answer to score.\n"
    lines = [f"# Scores of `{checkpoint}`", "", "| task | n | metric | score | chance | other |",
             "|---|---|---|---|---|---|"]
    for name, values in scores.items():
        metric, value, chance = _main_metric(values)
        other = "" if chance is not None else ", ".join(
            f"{k} {v:.3f}" for k, v in values.items() if k not in ("count", "cider_d"))
        lines.append(f"| {name} | {values['count']} | {metric} | {value:.3f} | "
                     f"{'' if chance is None else f'{chance:.3f}'} | {other} |")
    return "\n".join(lines) + "\n"


def scores_table(scores: dict[str, dict], title: str) -> Table:
    """The scores as a terminal table; closed-label tasks add their macro-F1 and UAR."""
    table = Table(title=title)
    labelled = any("macro_f1" in values for values in scores.values())
    for column in ("task", "n", "metric", "score", "chance", *(("macro-F1", "UAR") if labelled else ())):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, values in scores.items():
        metric, value, chance = _main_metric(values)
        style = "bold" if "/" not in name else "dim"
        extra = [f"{values[key]:.3f}" if key in values else "" for key in ("macro_f1", "uar")] if labelled else []
        table.add_row(name, str(values["count"]), metric, f"{value:.3f}", "" if chance is None else f"{chance:.3f}",
                      *extra, style=style)
    return table


def report(result: EvalResult) -> None:
    if result.scores:
        console.print(scores_table(result.scores, f"scores of {result.output_dir.parent.name}"))
    done = f"scored {len(result.scored)} checkpoint(s)"
    if result.already_scored:
        done += f", {len(result.already_scored)} already scored with these settings"
    if result.failed:
        done += f", [red]{len(result.failed)} could not be scored[/]"
    console.print(f"[bold green]evaluated[/]: {done} in {result.seconds:.1f} s; newest in {result.output_dir}"
                  + (f"; report {result.report} (open {result.report.with_suffix('.html')} in a browser to "
                     "listen to examples)" if result.report else ""), highlight=False)

