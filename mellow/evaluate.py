"""Stage 04: generate answers for a split from the store (never the raw audio) and score them.

Writes, next to the checkpoint (`<checkpoint>/eval-<split>/`):
    predictions.jsonl   one line per example: the example, the prediction, correct (closed tasks)
    scores.json         per task and task/subtask: accuracy with chance level, or caption metrics
    summary.md          the same as a Markdown table
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from mellow import metrics
from mellow.config import setting
from mellow.distributed import resolve_device
from mellow.data import ExampleSet, load_examples, move_to
from mellow.files import read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from mellow.progress import console, progress_bar
from mellow.store import EmbeddingStore
from mellow.checkpoint import find_checkpoint, load_trained_model


@dataclass
class EvalConfig:
    run: Path = setting(Path("checkpoints/run"), "A training run folder, or one checkpoint folder inside it.")
    which: str = setting("latest", "Checkpoint of the run to score: latest or best.")
    split: str = setting("test", "Split to generate answers for.")
    store: Path | None = setting(None, "Store to read (default: the one the checkpoint was trained on).")
    dataset: Path | None = setting(None, "Dataset folder with <split>.jsonl (default: the training one).")
    batch_size: int = setting(64, "Examples generated together.")
    max_new_tokens: int = setting(48, "Longest answer generated, in tokens.")
    beams: int = setting(1, "Beam width: 1 is greedy decoding (what the scores in the README use).")
    max_examples: int = setting(0, "Score only the first N examples of the split (0: all).")
    device: str = setting("auto", "auto (cuda if available), cpu, or cuda.")

    def __post_init__(self) -> None:
        if self.which not in ("latest", "best"):
            raise ValueError(f"--which {self.which!r} must be latest or best")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.beams < 1 or self.max_examples < 0:
            raise ValueError("--batch-size, --max-new-tokens and --beams must be >= 1, --max-examples >= 0")
        if not self.run.exists():
            raise ValueError(f"--run {self.run}: no such folder; pass a run folder made by 03_train")


@dataclass
class EvalResult:
    output_dir: Path
    scores: dict[str, dict]
    examples: int
    seconds: float


def run(config: EvalConfig) -> EvalResult:
    started = time.time()
    checkpoint, store, examples = validate_args(config)
    device = torch.device(resolve_device(config.device))
    model, tokenizer, _ = load_trained_model(checkpoint, device)
    example_set = ExampleSet(examples, store, tokenizer, max_text_tokens=256)
    predictions = generate_all(model, tokenizer, example_set, config, device)
    output_dir = checkpoint / f"eval-{config.split}"
    scores = write_outputs(output_dir, example_set.examples, predictions, checkpoint)
    result = EvalResult(output_dir, scores, len(predictions), time.time() - started)
    report(result)
    return result


def validate_args(config: EvalConfig) -> tuple[Path, EmbeddingStore, list[dict]]:
    checkpoint = find_checkpoint(config.run, config.which)
    trainer = read_json(checkpoint / "trainer.json")
    store = EmbeddingStore(config.store or Path(trainer["store"]))
    store.check_fingerprint(trainer["store_fingerprint"], f"checkpoint {checkpoint}")
    dataset = config.dataset or Path(trainer["config"]["train"]["dataset"])
    examples = load_examples(dataset, config.split)
    if config.max_examples:
        examples = examples[: config.max_examples]
    if not examples:
        raise ValueError(f"split {config.split!r} of {dataset} has no examples")
    return checkpoint, store, examples


def generate_all(model, tokenizer, example_set: ExampleSet, config: EvalConfig, device: torch.device) -> list[str]:
    """Answers for every example (greedy or beam search), batched; examples are sorted by prompt length to
    limit padding."""
    order = sorted(range(len(example_set)), key=lambda i: len(example_set.items[i].prompt_ids))
    predictions = [""] * len(order)
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


def write_outputs(output_dir: Path, examples: list[dict], predictions: list[str], checkpoint: Path) -> dict:
    scores = metrics.score(examples, predictions)
    rows = [{**example, "prediction": prediction,
             **({"correct": metrics.is_correct(example, prediction)} if example["task"] in metrics.CLOSED_TASKS
                else {})} for example, prediction in zip(examples, predictions)]
    write_jsonl_atomic(output_dir / "predictions.jsonl", rows)
    write_json_atomic(output_dir / "scores.json", {"checkpoint": str(checkpoint), "scores": scores})
    write_text_atomic(output_dir / "summary.md", markdown_summary(scores, checkpoint))
    return scores


def _main_metric(values: dict) -> tuple[str, float, float | None]:
    if "accuracy" in values:
        return "accuracy", values["accuracy"], values["chance"]
    return "CIDEr-D", values["cider_d"], None


def markdown_summary(scores: dict[str, dict], checkpoint: Path) -> str:
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
    table = Table(title=title)
    for column in ("task", "n", "metric", "score", "chance"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, values in scores.items():
        metric, value, chance = _main_metric(values)
        style = "bold" if "/" not in name else "dim"
        table.add_row(name, str(values["count"]), metric, f"{value:.3f}", "" if chance is None else f"{chance:.3f}",
                      style=style)
    return table


def report(result: EvalResult) -> None:
    console.print(scores_table(result.scores, f"scores ({result.examples} examples)"))
    console.print(f"[bold green]evaluated[/] {result.examples} examples in {result.seconds:.1f} s "
                  f"({result.examples / result.seconds:.1f} examples/s); outputs in {result.output_dir}")
