"""`mellow quickstart`: the whole pipeline on the built-in synthetic set, offline, on a laptop CPU.

The default profile (whisper-tiny encoder, 16 tokens per clip, a 4-layer 192-wide decoder, 1600 updates with
`--train.precision auto`) was chosen to finish in about 6 minutes on 2 CPU cores with native bf16 (AVX512-BF16
or AMX; fp32 elsewhere, ~1.5x slower); README.md lists the measured time and scores.
Every stage is re-runnable, so running quickstart twice reuses the dataset, the store and the trained run.
"""

from __future__ import annotations

import time
from pathlib import Path

from mellow.config import Layer, load, yaml_layer
from mellow.encode import precompute
from mellow.evaluate import score
from mellow.evaluate.score import scores_table
from mellow.progress import console
from mellow.settings import EncoderConfig, EvalConfig, PrecomputeConfig, QuickstartConfig, TrainJob
from mellow.sources import prepare
from mellow.sources.config import PrepareConfig
from mellow.store.writer import StoreConfig
from mellow.train import loop
from mellow.train.runs import saved_run_layers

PRESET = Path(__file__).resolve().parents[1] / "stages" / "configs" / "quickstart.yaml"


def training_job(config: QuickstartConfig, store: Path, dataset: Path, run_dir: Path | None) -> TrainJob:
    """The quickstart's training run: stages/configs/quickstart.yaml, with this machine's store, dataset and run
    folder, and --updates (validation and checkpoints every quarter of them); a run already in the folder keeps
    what its own config.yaml says of anything else (a run made by an earlier mellow, its layout)."""
    if not PRESET.is_file():
        raise FileNotFoundError(f"{PRESET}: the quickstart's training config is missing; run from a mellow checkout")
    every = max(1, config.updates // 4)
    given = {"train.store": store, "train.dataset": dataset, "train.max_updates": config.updates,
             "train.val_every": every, "train.save_every": every, "encoder.name": config.encoder,
             **({"train.run_dir": run_dir} if run_dir is not None else {})}
    saved = saved_run_layers(run_dir) if run_dir is not None else []
    return load(TrainJob, [*saved, yaml_layer(PRESET),
                           Layer(given, {name: f"quickstart {name}" for name in given})])


def run(config: QuickstartConfig) -> dict:
    """Run 00 -> 01 -> 03 -> 04 under config.root and return the test scores."""
    root = config.root
    started = time.time()
    timings = {}
    console.rule("[bold]00 prepare")
    dataset = prepare.run(PrepareConfig(root=root / "datasets", num_clips=config.num_clips))
    timings["prepare"] = time.time() - started
    console.rule("[bold]01 precompute")
    stage = time.time()
    expected = training_job(config, Path(""), dataset, None).encoder  # what the preset's store must be
    stored = precompute.run(PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name=config.encoder,
                                                                                    tokens=expected.tokens),
                                             store=StoreConfig(root=root / "shards")))
    timings["precompute"] = time.time() - stage
    console.rule("[bold]03 train")
    stage = time.time()
    run_dir = root / "checkpoints" / f"quickstart-{stored.store_path.name}"
    job = training_job(config, stored.store_path, dataset, run_dir)
    trained = loop.run(job.train, job.model, resume=True, expected=job.encoder)
    if trained.interrupted:
        console.print("quickstart stopped by Ctrl-C after saving; run `uv run mellow quickstart` again to continue")
        raise SystemExit(130)
    timings["train"] = time.time() - stage
    console.rule("[bold]04 eval")
    stage = time.time()
    result = score.run(EvalConfig(run=run_dir, which="latest", split="test"))
    timings["eval"] = time.time() - stage
    console.rule("[bold]quickstart done")
    console.print(scores_table(result.scores, "test scores"))
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    console.print(f"[bold green]quickstart finished[/] in {time.time() - started:.0f} s ({spent}).\n"
                  f"dataset {dataset}\nstore   {stored.store_path}\nrun     {run_dir}\n"
                  f"scores  {result.output_dir / 'summary.md'}\nreport  {result.report}\n"
                  f"listen  {result.report.with_suffix('.html')} (open it in a browser: examples with their audio)"
                  + "".join(f"\nconfusion matrix of {path.stem.removeprefix('confusion-')}: {path}"
                            for path in sorted(result.report.parent.glob("confusion-*.png"))))
    return result.scores

