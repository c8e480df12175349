"""Growth at the seeds' scale, in one run: start-up and memory of 03_train at 10 k / 100 k / 1 M examples, store
reads against the machine's own limit, the store's metadata paths at 1.2 M rows, tokenising a new split
on one core against all of them, the audio recheck of a rerun of 00_prepare / 01_precompute at 10 k / 100 k /
1 M clips against a bare stat of every file, and an epoch's token-budget plan (--train.batch_tokens) against the
sort of the split's lengths it cannot do without.

    uv run python benchmarks/scale.py                                  # everything (~20 min on 2 cores)
    uv run python benchmarks/scale.py --parts reads --sizes 10000      # one part
    uv run python benchmarks/scale.py --compare-with /tmp/old          # the same runs with another checkout's code

Everything is built without audio through mellow's own writers (StoreWriter, the manifest format) under --work.
Each measurement runs in a fresh process (its peak RSS is its own, read with wait4 / /proc). `--compare-with DIR`
runs the same stage commands with the mellow package of another checkout (e.g. `git worktree add /tmp/old
<commit>`), so before and after come from one run on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mellow.files import read_json  # noqa: E402
from mellow.store.reader import EmbeddingStore  # noqa: E402
from mellow.store.shards import ShardedRows  # noqa: E402
from mellow.store.writer import StoreConfig, StoreWriter  # noqa: E402

WORDS = ("dog bark rain engine siren bird chirp tone chord noise click silence loud quiet high low long short "
         "first second audio clip event sound louder higher longer pitch").split()


def write_store(path: Path, rows: int, tokens: int, dim: int, shard_clips: int = 0, seed: int = 0) -> float:
    """A finished store of random rows written by StoreWriter; returns the seconds it took."""
    if (path / "index.jsonl").exists():
        return 0.0
    shutil.rmtree(path, ignore_errors=True)
    started = time.time()
    fingerprint = {"encoder": "benchmark", "tokens": tokens, "dim": dim, "views": 1, "dtype": "float16"}
    writer = StoreWriter(path, rows, fingerprint, StoreConfig(shard_clips=shard_clips))
    generator = np.random.default_rng(seed)
    for shard in writer.missing_shards():
        shard_rows = writer.shard_rows(shard)
        embeddings = (generator.standard_normal((len(shard_rows), 1, tokens, dim)) * 0.5).astype(np.float16)
        valid = generator.integers(1, tokens + 1, (len(shard_rows), 1)).astype(np.int16)
        writer.write_shard(shard, embeddings, valid, [{"id": f"clip-{row:07d}", "row": row, "status": "ok"}
                                                      for row in shard_rows])
    writer.finalize({"dataset": "benchmark"})
    return time.time() - started


def write_split(path: Path, examples: int, clips: int, seed: int) -> None:
    """`examples` Mellow-shaped question/caption examples over `clips` clips (one or two audios each)."""
    if path.exists():
        return
    generator = np.random.default_rng(seed)
    temporary = path.with_suffix(".partial")
    with open(temporary, "w") as handle:
        for number in range(examples):
            words = generator.choice(WORDS, size=generator.integers(6, 30))
            answer = generator.choice(WORDS, size=generator.integers(1, 15))
            two = number % 3 == 0
            handle.write(json.dumps({
                "task": "comparison" if two else "caption", "audio1": f"clip-{generator.integers(clips):07d}",
                "audio2": f"clip-{generator.integers(clips):07d}" if two else None,
                "prompt": " ".join(words) + "?", "answer": " ".join(answer), "split": path.stem}) + "\n")
    os.replace(temporary, path)


def process_memory(pid: int) -> dict[str, float]:
    """RSS and private (unshared) memory of a process, in MB; empty when it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[-1] == "kB"}
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0) / 1024, "private": private / 1024}


def peak_rss(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB; 0 when it is gone. Cheap: no walk of its mappings."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), 0.0)


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_training(command: list[str], env: dict, run_dir: Path, first_update: int, last_update: int) -> dict:
    """Start a 03_train process and watch it: seconds to its first logged update past `first_update`, peak RSS of
    it and of each data worker, and each worker's private memory early (update >= first + 100) and last."""
    started = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, startup, peak, workers, offset = run_dir / "metrics.jsonl", None, 0.0, {}, 0
    update, memory_read = first_update, 0.0
    while process.poll() is None:
        if metrics.exists():
            with open(metrics) as handle:
                handle.seek(offset)
                for line in handle:
                    if line.endswith("\n"):
                        offset += len(line)
                        update = json.loads(line).get("update", update)
            if startup is None and update > first_update:
                startup = time.time() - started
        peak = max(peak, peak_rss(process.pid))
        if time.time() - memory_read < 1.0:  # reading smaps takes the process's mmap lock: once a second only,
            time.sleep(0.05)                  # or the watching slows the start-up it measures
            continue
        memory_read = time.time()
        for worker in children(process.pid):
            memory = process_memory(worker)
            if memory:
                seen = workers.setdefault(worker, {"peak_rss": 0.0, "early_private": None, "last_private": 0.0})
                seen["peak_rss"] = max(seen["peak_rss"], memory["rss"], peak_rss(worker))
                if seen["early_private"] is None and update >= first_update + 100:
                    seen["early_private"] = memory["private"]
                seen["last_private"] = memory["private"]
        time.sleep(0.05)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"startup_s": startup, "peak_rss_mb": peak, "seconds": time.time() - started,
            "workers": [value for value in workers.values() if value["early_private"] is not None],
            "reached": update, "wanted": last_update}


def training_command(code: Path, store: Path, dataset: Path, run_dir: Path, updates: int, resume: bool) -> list[str]:
    return [sys.executable, str(code / "stages" / "03_train.py"), "--train.store", str(store), "--train.dataset",
            str(dataset), "--train.run_dir", str(run_dir), "--train.max_updates", str(updates),
            "--train.batch_size", "8", "--train.log_every", "1", "--train.val_every", "0", "--train.save_every", "0",
            "--train.warmup_updates", "10", "--train.wandb", "off", "--train.tensorboard", "false",
            "--train.data_cache", "stream", "--model.decoder", "tiny", "--model.tiny_hidden", "32",
            "--model.tiny_layers", "1", "--model.tiny_heads", "2"] + (["--resume"] if resume else [])


def startup_part(args: argparse.Namespace, codes: dict[str, Path]) -> list[dict]:
    store = args.work / "startup-store"
    write_store(store, args.clips, tokens=4, dim=64, shard_clips=8192)
    results = []
    for size in args.sizes:
        dataset = args.work / f"dataset-{size}"
        dataset.mkdir(parents=True, exist_ok=True)
        write_split(dataset / "train.jsonl", size, args.clips, seed=size)
        write_split(dataset / "val.jsonl", 64, args.clips, seed=1)
        for label, code in codes.items():
            shutil.rmtree(dataset / ".cache", ignore_errors=True)  # each code starts from a bare dataset
            run_dir = args.work / f"run-{label}-{size}"
            shutil.rmtree(run_dir, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": "disabled"}
            # the first start stops after --updates (saving); the resume runs the last 200 of the same schedule
            for phase, first, last in (("start", 0, args.updates), ("resume", args.updates, args.updates + 200)):
                command = training_command(code, store, dataset, run_dir, args.updates + 200, phase == "resume")
                command += ["--train.stop_after", str(args.updates)] if phase == "start" else []
                result = run_training(command, env, run_dir, first, last)
                results.append({"code": label, "examples": size, "phase": phase, **result})
                print_startup(results[-1])
    return results


def print_startup(result: dict) -> None:
    workers = result["workers"]
    growth = [w["last_private"] - w["early_private"] for w in workers]
    peaks = ", ".join(f"{worker['peak_rss']:.0f}" for worker in workers)
    print(f"  {result['code']:>7} {result['examples']:>9,} {result['phase']:>6}: first update after "
          f"{result['startup_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, workers {peaks} MB peak RSS, "
          f"private memory growth {', '.join(f'{g:+.1f}' for g in growth)} MB over the run", flush=True)


def limit_rows_per_second(array_path: Path, rows: int) -> tuple[float, float, float]:
    """(rows/s, read MB/s, zstd MB/s) of one core reading every shard file from the page cache and zstd-decoding
    every chunk of it: the machine's limit for rows of this store."""
    from numcodecs import zstd

    reader = ShardedRows(array_path, threads=1)
    files = [reader.shard_path(shard) for shard in range(reader.num_shards)]
    for path in files:  # into the page cache
        path.read_bytes()
    started = time.perf_counter()
    contents = []
    for path in files:  # into one buffer per file, 4 MB per read: no copies besides the kernel's
        with open(path, "rb", buffering=0) as handle:
            content = bytearray(os.fstat(handle.fileno()).st_size)
            view, position = memoryview(content), 0
            while position < len(content):
                position += handle.readinto(view[position : position + (1 << 22)])
        contents.append(content)
    read_seconds = time.perf_counter() - started
    total = sum(len(content) for content in contents)
    decode_seconds, decoded = 0.0, 0
    for shard, content in enumerate(contents):
        table = reader.chunk_table(shard)
        started = time.perf_counter()
        for offset, nbytes in table[table[:, 0] != 2**64 - 1]:
            decoded += len(zstd.decompress(memoryview(content)[int(offset) : int(offset + nbytes) - 4]))
        decode_seconds += time.perf_counter() - started
    return rows / (read_seconds + decode_seconds), total / read_seconds / 1e6, decoded / decode_seconds / 1e6


def rows_per_second(read, rows: int, pattern: str, seconds: float) -> float:
    generator = np.random.default_rng(0)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        if pattern == "random":
            selection = generator.choice(rows, size=64, replace=False)
        else:
            start = int(generator.integers(0, rows - 1024))
            selection = np.arange(start, start + 1024)
        read(selection)
        done += len(selection)
    return done / (time.perf_counter() - started)


def reads_part(args: argparse.Namespace) -> list[dict]:
    import zarr

    results = []
    for name, rows, tokens, dim in (("mellow 129x768", 4096, 129, 768), ("quickstart 16x384", 20000, 16, 384)):
        path = args.work / f"reads-{tokens}x{dim}"
        write_store(path, rows, tokens, dim)
        array_path = path / "store.zarr" / "emb"
        limit, read_mb, zstd_mb = limit_rows_per_second(array_path, rows)
        row_mb = tokens * dim * 2 / 1e6
        print(f"  {name}: limit {limit:,.0f} rows/s ({limit * row_mb:,.0f} MB/s; page-cache read {read_mb:,.0f} MB/s,"
              f" zstd {zstd_mb:,.0f} MB/s, one core)", flush=True)
        array = zarr.open_group(path / "store.zarr", mode="r")["emb"]
        readers = {"zarr (before)": lambda selection: array.get_orthogonal_selection(selection),
                   "shard files, 1 thread": ShardedRows(array_path, threads=1).read,
                   "shard files, 2 threads": ShardedRows(array_path, threads=2).read,
                   # as 03_train and 04_eval read: shard file sizes and encoded rows checked on every read
                   "the store's checked reader": EmbeddingStore(path).row_reader(threads=2).read}
        for label, read in readers.items():
            for pattern in ("random", "contiguous"):
                rate = rows_per_second(read, rows, pattern, args.read_seconds)
                results.append({"store": name, "reader": label, "pattern": pattern, "rows_per_s": rate,
                                "mb_per_s": rate * row_mb, "limit_rows_per_s": limit, "ratio": rate / limit,
                                "workers_for_2000": math.ceil(2000 / rate)})
                print(f"    {label:>22} {pattern:>10}: {rate:8,.0f} rows/s {rate * row_mb:7,.0f} MB/s = "
                      f"{rate / limit:.2f}x the limit; {math.ceil(2000 / rate)} worker(s) feed 2 000 rows/s",
                      flush=True)
    return results


METADATA_STEPS = {
    "open store + 1 000 lookups": """
import mellow
assert mellow.__file__.startswith(CODE), mellow.__file__
try:
    from mellow.store.reader import EmbeddingStore
except ImportError:  # the flat modules of the code before 2026-12-07's packages
    from mellow.store import EmbeddingStore
store = EmbeddingStore(PATH)
ids = [f"clip-{row:07d}" for row in range(0, ROWS, ROWS // 1000)]
assert [store.rows[clip] for clip in ids] == list(range(0, ROWS, ROWS // 1000))
""",
    "eval start-up (store + 2 000-example split)": """
try:
    from mellow.model.decoders import load_tokenizer
    from mellow.store.reader import EmbeddingStore
    from mellow.train.data import ExampleSet, RowsFromZarr
except ImportError:  # the flat modules of the code before 2026-12-07's packages
    from mellow.data import ExampleSet, RowsFromZarr
    from mellow.decoders import load_tokenizer
    from mellow.store import EmbeddingStore
store, tokenizer = EmbeddingStore(PATH), load_tokenizer("tiny")
if hasattr(ExampleSet, "from_split"):  # eval as it is now: the split's token cache, rows read per batch
    examples = ExampleSet.from_split(DATASET, "test", store, tokenizer, 256, rows=RowsFromZarr(store))
else:  # eval before: the split as dicts, the whole store in RAM
    examples = ExampleSet(__import__("mellow.files").files.read_jsonl(DATASET / "test.jsonl"), store, tokenizer, 256)
assert len(examples) == 2000
examples.batch(list(range(64)), for_generation=True)
""",
}
METADATA_COMMANDS = {"store info": ["store", "info"], "store verify": ["store", "verify"],
                     "store finalize": ["store", "finalize"]}


def measured(command: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one process. The peak is its VmHWM, polled until it exits: wait4's ru_maxrss
    would count this benchmark's own pages, which the child holds between fork and exec. `cwd` keeps `python -c`
    from importing the checkout it is started in (its sys.path begins with the working folder)."""
    started, peak = time.time(), 0.0
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = ThreadPoolExecutor(1).submit(process.stdout.read)  # a full pipe would stop the child
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) / 1024)
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{reader.result().decode()[-3000:]}")
    return time.time() - started, peak


def metadata_part(args: argparse.Namespace, codes: dict[str, Path]) -> list[dict]:
    path, dataset = args.work / f"meta-store-{args.meta_rows}", args.work / "meta-dataset"
    seconds = write_store(path, args.meta_rows, tokens=1, dim=8, shard_clips=65536)
    if seconds:
        print(f"  wrote the {args.meta_rows:,}-row store with StoreWriter in {seconds:.0f} s", flush=True)
    dataset.mkdir(parents=True, exist_ok=True)
    write_split(dataset / "test.jsonl", 2000, args.meta_rows, seed=7)
    results = []
    for label, code in reversed(codes.items()):  # ours last: its finalize writes what ours reads
        env = {**os.environ, "PYTHONPATH": str(code)}
        baseline = measured([sys.executable, "-c", "try:\n import mellow.store.reader, mellow.train.data\n"
                                              "except ImportError:\n import mellow.store, mellow.data"], env, args.work)
        steps = {name: [sys.executable, "-c", f"from pathlib import Path\nPATH = Path({str(path)!r})\n"
                        f"DATASET = Path({str(dataset)!r})\nROWS = {args.meta_rows}\nCODE = {str(code)!r}\n" + body]
                 for name, body in METADATA_STEPS.items()}
        steps |= {name: [sys.executable, "-m", "mellow.cli", *words, str(path)]
                  for name, words in METADATA_COMMANDS.items()}
        for name, command in steps.items():
            seconds, rss = measured(command, env, args.work)
            results.append({"code": label, "step": name, "seconds": seconds, "peak_rss_mb": rss,
                            "imports_only_rss_mb": baseline[1], "imports_only_s": baseline[0]})
            print(f"  {label:>7} {name:>44}: {seconds:6.1f} s, peak RSS {rss:6.0f} MB (imports alone: "
                  f"{baseline[0]:.1f} s, {baseline[1]:.0f} MB)", flush=True)
    return results


def tokenize_part(args: argparse.Namespace) -> list[dict]:
    """Tokenising a new split once (a first start's one-time cost): one process against one per core, same run."""
    from mellow.model.decoders import load_tokenizer
    from mellow.store.reader import EmbeddingStore
    from mellow.train.tokens import tokenize_file

    store = args.work / "startup-store"
    write_store(store, args.clips, tokens=4, dim=64, shard_clips=8192)
    rows_of, tokenizer = EmbeddingStore(store).rows.lookup, load_tokenizer("tiny")
    cores, results = len(os.sched_getaffinity(0)), []
    for size in args.sizes:
        split = args.work / f"dataset-{size}" / "train.jsonl"
        split.parent.mkdir(parents=True, exist_ok=True)
        write_split(split, size, args.clips, seed=size)
        seconds = {}
        for processes in (1, cores):
            started = time.time()
            tokenize_file(split, rows_of, tokenizer, 96, "\n", processes=processes)  # 03_train's default
            seconds[processes] = time.time() - started
        results.append({"examples": size, "cores": cores, "seconds": seconds})
        print(f"  {size:>9,} examples: one process {seconds[1]:.1f} s ({size / seconds[1]:,.0f} examples/s), "
              f"{cores} processes {seconds[cores]:.1f} s: {seconds[1] / seconds[cores]:.2f}x", flush=True)
    return results


def write_audio_dataset(folder: Path, clips: int) -> list[dict]:
    """`clips` small files (their bytes do not matter: only stat and sha256 are measured), 1 000 per folder, and
    an audio.jsonl recording each one's sha256, size and mtime, as 00_prepare writes it. Reused if there."""
    manifest = folder / "audio.jsonl"
    if manifest.exists():
        return [json.loads(line) for line in manifest.read_text().splitlines()]
    records = []
    for clip in range(clips):
        path = folder / "audio" / f"{clip // 1000:04d}" / f"clip-{clip:07d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = clip.to_bytes(8, "little") * 8
        path.write_bytes(data)
        status = path.stat()
        records.append({"id": f"clip-{clip:07d}", "path": str(path.relative_to(folder)), "duration": 1.0,
                        "sha256": hashlib.sha256(data).hexdigest(), "bytes": status.st_size,
                        "mtime_ns": status.st_mtime_ns})
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def write_audio_store(path: Path, records: list[dict]) -> None:
    """A finished store of tiny rows whose markers record each clip's file as 01_precompute does."""
    if (path / "index.jsonl").exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    fingerprint = {"encoder": "benchmark", "tokens": 1, "dim": 8, "views": 1, "dtype": "float16"}
    writer = StoreWriter(path, len(records), fingerprint, StoreConfig(shard_clips=65536))
    for shard in writer.missing_shards():
        rows = writer.shard_rows(shard)
        writer.write_shard(shard, np.ones((len(rows), 1, 1, 8), np.float16), np.ones((len(rows), 1), np.int16),
                           [{**records[row], "row": row, "status": "ok"} for row in rows])
    writer.finalize({"dataset": "benchmark"})


def stat_limit(folder: Path, store: Path) -> float:
    """Seconds for the least a recheck must do, on one core: parse audio.jsonl, stat every file, parse every
    shard marker."""
    started = time.time()
    for line in (folder / "audio.jsonl").read_text().splitlines():
        os.stat(folder / json.loads(line)["path"])
    for marker in sorted((store / "parts").glob("shard-*.json")):
        json.loads(marker.read_text())
    return time.time() - started


def recheck_part(args: argparse.Namespace) -> list[dict]:
    """What a rerun of 00_prepare or 01_precompute pays to notice edited audio, at 10 k / 100 k / 1 M clips:
    a stat per clip (nothing changed, so nothing is hashed), against stat_limit in the same run."""
    from mellow.encode import precompute
    from mellow.manifests import read_audio_records
    from mellow.settings import EncoderConfig, PrecomputeConfig
    from mellow.sources import prepare
    from mellow.sources.config import PrepareConfig

    results = []
    for clips in args.sizes:
        folder, store = args.work / f"recheck-{clips}" / "dataset", args.work / f"recheck-{clips}" / "store"
        records = write_audio_dataset(folder, clips)
        write_audio_store(store, records)
        limits, ours = [stat_limit(folder, store)], {}
        started = time.time()
        config = PrecomputeConfig(dataset=folder, encoder=EncoderConfig(name="mel", tokens=1))
        writer = StoreWriter(store, clips, read_json(store / "meta.json")["fingerprint"], StoreConfig())
        verdicts, stats = precompute.audio_changes(config, writer, read_audio_records(folder))
        ours["01_precompute"] = time.time() - started
        assert not stats and not any(verdicts.values()), "nothing changed, so nothing is to do"
        limits.append(stat_limit(folder, store))
        started = time.time()
        prepare.recheck_audio(PrepareConfig(root=folder.parent, name=folder.name), started)
        ours["00_prepare"] = time.time() - started
        limits.append(stat_limit(folder, store))
        limit = sum(limits) / len(limits)
        results.append({"clips": clips, "limit_s": limit, **{f"{stage}_s": seconds for stage, seconds in ours.items()}})
        print(f"  {clips:>9,} clips: limit {limit:.2f} s ({clips / limit:,.0f} clips/s); "
              + "; ".join(f"{stage} recheck {seconds:.2f} s = {seconds / limit:.2f}x the limit"
                          for stage, seconds in ours.items()), flush=True)
    return results


def plan_part(args: argparse.Namespace) -> list[dict]:
    """One epoch's token-budget plan (ReasonAQA-shaped lengths, 8 192 positions, 16 buckets) at each size, against
    its limit measured in the same run: a stable argsort of the epoch's examples by length (the plan's own first
    step) and a numpy permutation; the packed plan (rows of 1 024 positions, 8 a batch) and the fixed-size plan of
    batch 64 beside it."""
    from mellow.train.batching import PackedBatches, TokenBatches, epoch_micro_batches

    results = []
    for size in args.sizes:
        generator = np.random.default_rng(size)
        positions = 130 + generator.integers(10, 41, size) + generator.integers(1, 161, size)
        timings = {}
        for name, work in (("limit", lambda: np.argsort(positions[generator.permutation(size)], kind="stable")),
                           ("tokens", lambda: TokenBatches(positions, 8192, 8, 0, 16).epoch(0)),
                           ("packed", lambda: PackedBatches(positions, 8192, 1024, 8, 0).epoch(0)),
                           ("fixed", lambda: epoch_micro_batches(positions, 64, 0, 0, 1))):
            started = time.perf_counter()
            work()
            timings[name] = time.perf_counter() - started
        results.append({"examples": size, "seconds": timings})
        ratio = timings["tokens"] / timings["limit"]
        print(f"  {size:>9,} examples: token plan {timings['tokens']:.3f} s = {ratio:.1f}x the sort by length "
              f"({timings['limit']:.3f} s); packed plan {timings['packed']:.3f} s = "
              f"{timings['packed'] / timings['limit']:.1f}x; fixed-size plan {timings['fixed']:.3f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="reads,metadata,startup,tokenize,recheck,plan",
                        help="Comma-separated: reads, metadata, startup, tokenize, recheck, plan.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="Training examples of each start-up run.")
    parser.add_argument("--clips", type=int, default=50_000, help="Clips in the start-up runs' store.")
    parser.add_argument("--updates", type=int, default=1000, help="Updates of each first start (a resume adds 200).")
    parser.add_argument("--meta-rows", type=int, default=1_200_000, help="Rows of the metadata store.")
    parser.add_argument("--read-seconds", type=float, default=3.0, help="Seconds each read pattern is timed.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mellow-scale"), help="Where the data goes (reused).")
    parser.add_argument("--compare-with", type=Path, help="Another checkout whose code runs the same steps.")
    parser.add_argument("--output", type=Path, help="Write every figure to this JSON file.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    codes = {"now": ROOT} | ({"compare": args.compare_with.resolve()} if args.compare_with else {})
    results = {}
    for part in args.parts.split(","):
        print(f"{part}:", flush=True)
        results[part] = {"reads": lambda: reads_part(args), "metadata": lambda: metadata_part(args, codes),
                         "startup": lambda: startup_part(args, codes), "tokenize": lambda: tokenize_part(args),
                         "recheck": lambda: recheck_part(args), "plan": lambda: plan_part(args)}[part]()
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
