"""Peak memory and samples/s of training at activation memory budgets 1.0, 0.5 and 0, in one run.

    uv run python benchmarks/mem_budget.py                       # SmolLM2-135M, full fine-tuning, bf16
    uv run python benchmarks/mem_budget.py --decoder tiny --batch-size 32

Each budget trains the same model on the same batches for --updates updates in its own `03_train` process
(so each peak is that process's own): peak memory is the process's peak resident set on a CPU (CUDA memory on a
GPU), from metrics.jsonl; samples/s is the mean over the updates after the first. The ratios are against
budget 1.0 in the same run: below 1 the decoder's layers recompute their activations in the backward pass
(--train.mem_budget; with --train.compile, torch.compile's partitioner does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_store(work: Path, clips: int) -> tuple[Path, Path]:
    """A small synthetic dataset and its whisper-tiny store (16 tokens), as the quickstart makes."""
    from mellow.encode import precompute
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.sources import prepare
    from mellow.sources.config import PrepareConfig
    from mellow.store.writer import StoreConfig

    dataset = prepare.run(PrepareConfig(root=work / "datasets", num_clips=clips))
    store = precompute.run(PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="whisper-tiny", tokens=16),
                                            store=StoreConfig(root=work / "shards"))).store_path
    return dataset, store


def train_once(args: argparse.Namespace, dataset: Path, store: Path, budget: float, run_dir: Path) -> dict:
    command = [sys.executable, str(ROOT / "stages" / "03_train.py"), f"--train.store={store}",
               f"--train.dataset={dataset}", f"--train.run_dir={run_dir}", f"--train.max_updates={args.updates}",
               f"--train.batch_size={args.batch_size}", "--train.val_every=0", f"--train.save_every={args.updates}",
               "--train.log_every=1", "--train.precision=bf16", f"--train.mem_budget={budget}",
               f"--model.decoder={args.decoder}", f"--model.decoder_mode={args.decoder_mode}",
               "--train.tensorboard=false", "--train.wandb=off"]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"samples_per_s"' in line]
    speeds = [row["samples_per_s"] for row in rows[1:]] or [rows[0]["samples_per_s"]]
    return {"budget": budget, "peak_memory_mb": max(row["peak_memory_mb"] for row in rows),
            "samples_per_s": sum(speeds) / len(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", default="smollm2-135m")
    parser.add_argument("--decoder-mode", default="full")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--clips", type=int, default=120, help="Clips of the synthetic dataset the store is made of.")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mellow-mem-") as folder:
        work = Path(folder)
        dataset, store = make_store(work, args.clips)
        results = [train_once(args, dataset, store, budget, work / f"run-{budget:g}") for budget in args.budgets]
    base = results[0]
    print(f"{args.decoder} ({args.decoder_mode}), bf16 autocast, batch {args.batch_size}, {args.updates} updates "
          f"per budget, {os.cpu_count()} CPU cores")
    print("| mem_budget | peak memory | vs 1.0 | samples/s | vs 1.0 |")
    print("|---|---|---|---|---|")
    for row in results:
        memory, speed = row["peak_memory_mb"] / base["peak_memory_mb"], row["samples_per_s"] / base["samples_per_s"]
        print(f"| {row['budget']:g} | {row['peak_memory_mb']:.0f} MB | {memory:.2f}× | {row['samples_per_s']:.2f} "
              f"| {speed:.2f}× |")


if __name__ == "__main__":
    main()
