"""A per-machine `.env`: settings and secrets that belong to a machine, not to a config (where the data, stores
and runs live, HF_HOME, WANDB_API_KEY, the ffmpeg to use).

Every stage and `mellow` command reads `.env` in the folder it runs in, or the file `MELLOW_ENV_FILE` names,
before anything else. The real environment wins: a variable already set is never replaced. The file is data:
`NAME=value` lines (an optional `export ` prefix, `#` comments, single or double quotes around the value), never
run by a shell, no `$VAR` or `$(command)` expansion. `.env.example` documents every variable below;
`mellow doctor` shows which came from where, secrets masked. No secret is ever written to a run's files."""

from __future__ import annotations

import os
import re
from pathlib import Path

# name -> (what it sets, whether it is a secret)
VARIABLES: dict[str, tuple[str, bool]] = {
    "MELLOW_DATASETS": ("folder that holds the datasets (00_prepare --root; default datasets)", False),
    "MELLOW_SHARDS": ("folder that holds the embedding stores (01_precompute --store-root; default shards)", False),
    "MELLOW_CHECKPOINTS": ("folder that holds the training runs (03_train --train.run_dir <it>/run; where --resume "
                           "and 04_eval look for the most recent run; default checkpoints)", False),
    "MELLOW_CACHE": ("mellow's cache: converted decoders, token caches of read-only datasets (default "
                     "~/.cache/mellow)", False),
    "MELLOW_FFMPEG": ("the ffmpeg binary to run (default: ffmpeg on PATH, else imageio-ffmpeg's)", False),
    "MELLOW_DECODER": ("how audio is decoded: pyav (in process) or cli (an ffmpeg process per clip)", False),
    "MELLOW_LOG_SECONDS": ("seconds between plain progress lines where the output is not a terminal (30)", False),
    "MELLOW_HTTP_RETRIES": ("attempts per http(s) tar or clip before it counts as failed", False),
    "MELLOW_HTTP_STALL_SECONDS": ("seconds without a byte before an http(s) read is abandoned", False),
    "HF_HOME": ("the Hugging Face cache (hf: encoders, decoders and datasets are found there)", False),
    "HF_HUB_OFFLINE": ("1: never reach the Hugging Face Hub, only the cache", False),
    "HF_TOKEN": ("a Hugging Face token, for gated models and datasets", True),
    "MELLOW_API_KEY": ("the key `mellow serve` requires of every request (Authorization: Bearer <key>)", True),
    "WANDB_API_KEY": ("a Weights & Biases key: training logs to W&B (--train.wandb auto)", True),
    "WANDB_MODE": ("online, offline or disabled: W&B's mode (set: training logs to W&B unless disabled)", False),
}


SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")


# name -> where its value came from (".env:3"), for the variables this process took from the file
loaded: dict[str, str] = {}


ENV_FILE: Path | None = None  # the file read, if any


def env_file_path() -> Path:
    return Path(os.environ.get("MELLOW_ENV_FILE") or ".env")


def parse(path: Path) -> dict[str, tuple[str, int]]:
    """{name: (value, line number)} of a .env file; a line that is not NAME=value is a ValueError naming it."""
    values: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = LINE.fullmatch(line)
        if not match:
            raise ValueError(f"{path}:{number}: not a NAME=value line: {raw[:60]!r}")
        name, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value).strip()  # a trailing comment after an unquoted value
        values[name] = (value, number)
    return values


def load_env_file() -> Path | None:
    """Set every variable of the .env file that the environment does not already hold; returns the file read
    (None if there is none). MELLOW_ENV_FILE naming a missing file is an error."""
    global ENV_FILE
    path = env_file_path()
    if not path.is_file():
        if os.environ.get("MELLOW_ENV_FILE"):
            raise FileNotFoundError(f"MELLOW_ENV_FILE={path}: no such file")
        return None
    for name, (value, number) in parse(path).items():
        if name not in os.environ:
            os.environ[name] = value
            loaded[name] = f"{path}:{number}"
    ENV_FILE = path
    return path


def is_secret(name: str) -> bool:
    return VARIABLES.get(name, ("", False))[1] or bool(SECRET.search(name))


def shown(name: str, value: str) -> str:
    """A value as it may be printed: a secret masked to its first 4 characters."""
    if not is_secret(name):
        return value
    return f"{value[:4]}… (secret, {len(value)} characters)" if len(value) > 8 else "… (secret)"


def sources() -> list[tuple[str, str, str]]:
    """(name, value as shown, where from) for every documented variable and every one the file set."""
    rows = []
    for name in [*VARIABLES, *sorted(set(loaded) - set(VARIABLES))]:
        if name in os.environ:
            rows.append((name, shown(name, os.environ[name]), loaded.get(name, "environment")))
        else:
            rows.append((name, "", "unset"))
    return rows


def secret_values() -> list[str]:
    """The values of the secrets set now (to check that none is written anywhere)."""
    return [value for name, value in os.environ.items() if is_secret(name) and len(value) >= 6]

