"""The command line: every stage end to end through `mellow ...`, stage scripts, and clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import read_json

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_all_stages_end_to_end_then_rerun(tmp_path):
    datasets, shards, run_dir = tmp_path / "datasets", tmp_path / "shards", tmp_path / "checkpoints" / "e2e"
    code, output = invoke("prepare", "--root", datasets, "--num-clips", 16, "--max-seconds", 2.5)
    assert code == 0, output
    assert "prepared" in output and (datasets / "synth" / "prepare.json").is_file()
    code, output = invoke("precompute", datasets / "synth", "--encoder", "mel", "--tokens", 4, "--clip-seconds",
                          2.5, "--store-root", shards, "--shard-clips", 6)
    assert code == 0, output
    [store] = list((shards / "synth").iterdir())
    assert read_json(store / "meta.json")["counts"]["ok"] == 16
    code, output = invoke("train", f"--train.store={store}", f"--train.dataset={datasets / 'synth'}",
                          f"--train.run_dir={run_dir}", "--train.max_updates", 4, "--train.batch_size", 4,
                          "--train.val_every", 2, "--model.tiny_hidden", 32, "--model.tiny_layers", 1,
                          "--model.tiny_heads", 2)
    assert code == 0, output
    assert (run_dir / "config.yaml").is_file() and read_json(run_dir / "latest.json")["update"] == 4
    code, output = invoke("eval", run_dir, "--split", "val", "--max-new-tokens", 6)
    assert code == 0, output
    assert (run_dir / "step-000004" / "eval-val" / "scores.json").is_file()
    assert "evaluated" in output
    # every stage is re-runnable: done work is skipped
    code, output = invoke("prepare", "--root", datasets, "--num-clips", 16, "--max-seconds", 2.5)
    assert code == 0 and "already prepared" in output
    code, output = invoke("precompute", datasets / "synth", "--encoder", "mel", "--tokens", 4, "--clip-seconds",
                          2.5, "--store-root", shards, "--shard-clips", 6)
    assert code == 0 and "0 shard(s) computed, 3 already done" in output.replace("\n", " ")
    code, output = invoke("train", f"--train.store={store}", f"--train.run_dir={run_dir}", "--resume",
                          f"--train.dataset={datasets / 'synth'}", "--train.max_updates", 4,
                          "--train.batch_size", 4, "--model.tiny_hidden", 32, "--model.tiny_layers", 1,
                          "--model.tiny_heads", 2)
    assert code == 0, output


HELP_OF_EVERY_SCRIPT = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        print(f"EXIT {script} {done.code}", flush=True)
"""


def test_stage_scripts_show_help():
    """Each stage script, run as a script (one interpreter for all: each would pay the same imports)."""
    scripts = [str(REPO / "stages" / f"{name}.py") for name in
               ("00_prepare", "01_precompute", "01_precompute_captions", "02_align", "03_train", "04_eval")]
    completed = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_SCRIPT, *scripts], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    sections = completed.stdout.split("EXIT ")
    assert len(sections) == len(scripts) + 1
    commands = ("prepare", "precompute", "precompute-captions", "align", "train", "eval")
    for script, command, section, ending in zip(scripts, commands, sections, sections[1:]):
        assert ending.startswith(f"{script} 0"), ending
        assert "Usage" in section and "Stage 0" in section, section
        usage = " ".join(section[section.index("Usage:"):].split()[:3])  # the script as typed, no subcommand
        assert usage.startswith(f"Usage: {Path(script).name} [OPTIONS]"), usage
        assert f"{Path(script).name} {command} " not in section, section


def test_help_bad_settings_and_store_commands_do_not_import_torch(mel_store, tmp_path):
    """`mellow --help`, a stage's --help, a bad setting and the store commands (info, verify, finalize on a real
    store) run without torch or transformers (~1 s, not ~7 s): the settings live in mellow.settings, and a
    stage's module is imported only when the stage runs."""
    store = shutil.copytree(mel_store, tmp_path / "store")  # finalize rewrites its index
    probe = ("import sys\nfrom mellow.cli import app\n"
             "for args in (['--help'], ['train', '--help'], ['train', '--train.lr', '0'],\n"
             f"             ['store', 'info', {str(store)!r}], ['store', 'verify', {str(store)!r}],\n"
             f"             ['store', 'finalize', {str(store)!r}]):\n"
             "    try:\n        app(args)\n    except SystemExit as done:\n        print('EXIT', done.code)\n"
             "print('HEAVY', sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert completed.stdout.count("EXIT 0") == 5 and completed.stdout.count("EXIT 2") == 1, completed.stdout[-3000:]
    assert "--train.lr must be > 0" in completed.stdout, completed.stdout[-2000:]
    assert "fingerprint:" in completed.stdout and "verified" in completed.stdout and "finalized" in completed.stdout
    assert "HEAVY []" in completed.stdout, completed.stdout[-500:]


def test_train_help_lists_every_option():
    code, output = invoke("train", "--help")
    assert code == 0
    for option in ("--train.optimizer.lr", "--train.lr", "--train.max_updates", "--model.decoder",
                   "--model.decoder_mode", "--train.data.batch_size", "--train.tracking.wandb"):
        assert option in output


def test_bad_encoder_name_is_a_clear_error(tiny_dataset, tmp_path):
    code, output = invoke("precompute", tiny_dataset, "--encoder", "no-such-encoder", "--store-root", tmp_path)
    assert code == 2
    assert "--encoder 'no-such-encoder' is unknown" in output and "whisper-tiny" in output


def test_nonexistent_input_path_is_a_clear_error(tmp_path):
    code, output = invoke("precompute", tmp_path / "nowhere", "--encoder", "mel")
    assert code == 2 and "no audio.jsonl there; run 00_prepare first" in output
    code, output = invoke("eval", tmp_path / "no-run")
    assert code == 2 and "no such folder" in output
    code, output = invoke("train", f"--train.store={tmp_path / 'no-store'}")
    assert code == 2 and "is not an embedding store" in output


def test_bad_config_values_name_the_option(tmp_path):
    code, output = invoke("train", "--train.lr", "fast")
    assert code == 2 and "--train.lr: expected a number, got 'fast'" in output
    code, output = invoke("train", "--train.batchsize", "4")  # the nearest option, not all 46 of them
    assert code == 2 and output.strip() == "error: unknown option --train.batchsize (did you mean " \
                                           "--train.batch_size?)", output
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  lr: 0.001\n  max_update: 5\n")
    code, output = invoke("train", "--config", config, "--train.zzz", "1")
    assert code == 2 and f"unknown option {config}:3: train.max_update (did you mean train.max_updates?)" in output
    assert "unknown option --train.zzz (--help lists every option)" in output
    code, output = invoke("train", "--model.decoder_mode", "sideways")
    assert code == 2 and "--model.decoder_mode: expected one of full, frozen, lora, got 'sideways'" in output


def test_missing_ffmpeg_stops_precompute_with_a_clear_error(tiny_dataset, tmp_path):
    env = {**os.environ, "MELLOW_FFMPEG": str(tmp_path / "no-ffmpeg")}
    completed = subprocess.run([sys.executable, "-m", "mellow.cli", "precompute", str(tiny_dataset), "--encoder",
                                "mel", "--store-root", str(tmp_path)], capture_output=True, text=True, env=env,
                               timeout=120)
    assert completed.returncode == 2
    assert "MELLOW_FFMPEG" in completed.stdout and "not an executable file" in completed.stdout


def test_quickstart_runs_every_stage_and_prints_scores(tmp_path):
    code, output = invoke("quickstart", "--root", tmp_path, "--num-clips", 20, "--updates", 3)
    assert code == 0, output
    assert "quickstart finished" in output and "test scores" in output and "yes_no" in output
    [run_dir] = list((tmp_path / "checkpoints").iterdir())
    assert read_json(run_dir / "latest.json")["update"] == 3
    assert list(run_dir.glob("step-*/eval-test/scores.json"))
    code, output = invoke("quickstart", "--root", tmp_path, "--num-clips", 20, "--updates", 3)
    assert code == 0 and "already prepared" in output  # a second run reuses every stage's output


def test_output_that_is_not_a_terminal_gets_plain_progress_lines(tmp_path):
    """A SLURM log or a pipe cannot show a redrawn bar: plain lines say where the work is instead."""
    completed = subprocess.run([sys.executable, "-m", "mellow.cli", "prepare", "--root", str(tmp_path),
                                "--num-clips", "10"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "MELLOW_LOG_SECONDS": "0"})
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("writing audio ")]
    assert re.search(r"^writing audio 5/10: elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d$", completed.stdout,
                     re.MULTILINE), completed.stdout
    assert len(lines) >= 10  # one a step at MELLOW_LOG_SECONDS=0, then rich's final bar


def test_help_wraps_at_any_width_and_never_cuts_a_value(monkeypatch):
    import typer.rich_utils

    commands = [[command.name] for command in app.registered_commands if command.name]
    commands += [["store", name] for name in ("info", "finalize", "export-wds", "verify")]
    assert ["prepare"] in commands and ["train"] in commands
    for width in (60, 80):
        monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", width)
        for command in commands:
            result = CliRunner().invoke(app, [*command, "--help"])
            assert result.exit_code == 0 and "…" not in result.output, (width, command, result.output)
            assert max(len(line) for line in result.output.splitlines()) <= width
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 200)  # a wide terminal: the whole width is used
    wide = CliRunner().invoke(app, ["prepare", "--help"]).output
    assert "`folder:<manifest.csv|jsonl>`" in wide and max(map(len, wide.splitlines())) > 150
