"""The per-machine .env: read by every command (the real environment wins), data never code, documented in
.env.example, shown by `mellow doctor` with secrets masked, and no secret written anywhere a run writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mellow import envfile

ROOT = Path(__file__).resolve().parents[1]


def test_env_lines_are_data_quotes_comments_and_export_and_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / ".env"
    path.write_text("# machine\nexport A_ROOT=/data/x\nB='two words'  \nC=\"$(touch pwned)\"\nD=plain # note\n\n"
                    "E=${HOME}/y\n")
    assert envfile.parse(path) == {"A_ROOT": ("/data/x", 2), "B": ("two words", 3), "C": ("$(touch pwned)", 4),
                                   "D": ("plain", 5), "E": ("${HOME}/y", 7)}
    assert not (tmp_path / "pwned").exists()
    path.write_text("A=1\nrm -rf /\n")
    with pytest.raises(ValueError, match=r"\.env:2: not a NAME=value line"):
        envfile.parse(path)


def test_env_example_documents_every_variable_and_env_is_ignored_by_git():
    example = (ROOT / ".env.example").read_text()
    for name, (what, _) in envfile.VARIABLES.items():
        assert f"# {name}=" in example and what in example
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert envfile.shown("WANDB_API_KEY", "abcdefghijkl") == "abcd… (secret, 12 characters)"
    assert envfile.shown("MY_SERVICE_TOKEN", "short") == "… (secret)" and envfile.shown("HF_HOME", "/x") == "/x"


def _run(cwd: Path, environment: dict, *arguments: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "mellow.cli", *arguments], cwd=cwd, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


@pytest.mark.slow
def test_every_command_reads_env_the_environment_wins_and_no_secret_is_written(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secret_token_987654"}
    (project / ".env").write_text(f"MELLOW_DATASETS={tmp_path / 'data'}\nMELLOW_SHARDS={tmp_path / 'from-env'}\n"
                                  f"MELLOW_CHECKPOINTS={tmp_path / 'runs'}\nWANDB_MODE=offline\n"
                                  + "".join(f"{name}={value}\n" for name, value in secrets.items()))
    environment = {key: value for key, value in os.environ.items() if key not in (*secrets, "WANDB_MODE")}
    environment["MELLOW_SHARDS"] = str(tmp_path / "real-env")  # the real environment wins over .env
    outputs = [_run(project, environment, "prepare", "--num-clips", "12", "--max-seconds", "2"),
               _run(project, environment, "precompute", str(tmp_path / "data" / "synth"), "--encoder", "mel",
                    "--clip-seconds", "2", "--tokens", "4")]
    [store] = (tmp_path / "real-env" / "synth").iterdir()
    assert not (tmp_path / "from-env").exists()
    outputs.append(_run(project, environment, "train", f"--train.store={store}",
                        f"--train.dataset={tmp_path / 'data' / 'synth'}", "--train.max_updates=2",
                        "--train.batch_size=4", "--train.val_every=0", "--train.save_every=2",
                        "--model.tiny_hidden=32", "--model.tiny_layers=1", "--model.tiny_heads=2"))
    run_dir = tmp_path / "runs" / "run"  # MELLOW_CHECKPOINTS/run, the default run folder
    assert (run_dir / "latest.json").is_file() and (run_dir / "wandb").is_dir()  # the key switched W&B on
    outputs.append(_run(project, environment, "export", "--checkpoint", str(run_dir), "--out",
                        str(tmp_path / "exported")))
    doctor = subprocess.run([sys.executable, "-m", "mellow.cli", "doctor"], cwd=project,
                            env={**environment, "COLUMNS": "250"}, capture_output=True, text=True, timeout=600)
    outputs.append(doctor)
    assert re.search(rf"MELLOW_SHARDS +{re.escape(str(tmp_path / 'real-env'))} +\(from environment\)", doctor.stdout)
    assert re.search(rf"MELLOW_DATASETS +{re.escape(str(tmp_path / 'data'))} +\(from \.env:1\)", doctor.stdout)
    assert re.search(r"WANDB_API_KEY +wand… \(secret, 29 characters\) +\(from \.env:5\)", doctor.stdout)
    written = [path for folder in ("data", "real-env", "runs", "exported") for path in (tmp_path / folder).rglob("*")
               if path.is_file()]
    assert len(written) > 20
    for secret in secrets.values():
        assert not any(secret in output.stdout + output.stderr for output in outputs)
        leaked = [path for path in written if secret.encode() in path.read_bytes()]
        assert not leaked, leaked
