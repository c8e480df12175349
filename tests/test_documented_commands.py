"""Every command the README, docs/ and the stage scripts show still parses as written: each option names a setting
of its stage (full dotted name, a shorter form, or a documented short flag) and the command line is one click
accepts. The values are not run here; the end-to-end tests run the stages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from mellow.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "stages").rglob("*.sh")),
             *sorted((REPO / "stages" / "configs").glob("*.yaml"))]
SCRIPTS = {"00_prepare": "prepare", "01_precompute": "precompute", "01_precompute_captions": "precompute-captions",
           "02_align": "align", "03_train": "train", "04_eval": "eval"}
COMMAND = re.compile(r"(?:stages/(0\d[a-z_]*)\.py|\bmellow (prepare|precompute-captions|precompute|align|train|eval|"
                     r"ask|export|doctor|quickstart|serve)\b)([^`\n]*)")


def documented_commands() -> list[tuple[str, str, str]]:
    """(where, command, its arguments) of every stage command line in the docs: lines of code blocks and inline
    code that run a stage (`uv run ...`, `mellow ...`), continuation lines joined, comments dropped."""
    found = []
    for document in DOCUMENTS:
        fenced = document.suffix != ".md"
        for number, line in logical_lines(document.read_text(encoding="utf-8")):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            spans = [line] if fenced else re.findall(r"`([^`]+)`", line)
            for span in spans:
                span = span.split(" # ")[0].split("  #")[0]
                for match in COMMAND.finditer(span):
                    if "uv run" not in span[: match.start()] and not span.lstrip().startswith("mellow"):
                        continue
                    command = SCRIPTS.get(match.group(1) or "", match.group(2))
                    arguments = re.split(r"\s(?:&&|\||;)\s|\)", match.group(3))[0]
                    if command and "--" in arguments and "--help" not in arguments:
                        found.append((f"{document.relative_to(REPO)}:{number}", command, arguments.strip()))
    return found


def logical_lines(text: str):
    """(number of its first line, line) with shell continuation lines (ending in a backslash) joined."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", 0


def as_written(words: list[str]) -> list[str]:
    """The words of a documented command, its `...` as a value where an option takes one, else left out."""
    kept = []
    for word in words:
        if word == "...":
            if kept and kept[-1].startswith("--") and "=" not in kept[-1]:
                kept.append("PLACEHOLDER")
            continue
        kept.append(word)
    return kept


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_stage():
    assert {command for _, command, _ in COMMANDS} >= {"prepare", "precompute", "align", "train", "eval", "ask",
                                                       "export", "doctor", "serve"}
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,command,arguments", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_a_documented_command_parses_as_written(where, command, arguments):
    try:
        words = shlex.split(arguments)
    except ValueError:
        pytest.skip(f"{where}: not one shell command line")
    stage = typer.main.get_command(app).commands[command]
    context = stage.make_context(command, as_written(words))
    names = context.meta["names"]
    for name in context.meta["settings"].values:
        names.resolve(name, f"{where}: --{name}")  # raises: an option the stage does not take
