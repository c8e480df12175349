"""Config mistakes are one line, never a traceback: every option of every config given a value of the wrong type
(in a YAML file, as a dotted override, or as a command-line flag) and a YAML file that is not valid YAML each get
one line naming the file and line (for YAML), the option and the type it expects."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
import typer
from typer.testing import CliRunner

from mellow.cli import TRAIN_SECTIONS, app


def _wrong_values(annotation) -> list:
    """Values of another type than `annotation` allows, as YAML would give them."""
    if typing.get_origin(annotation) in (typing.Union, typing.types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return ["nonsense", [1]]
    wrong = {int: [128.5, [8], "eight", True], float: [[0.5], "fast", {"a": 1}, False], bool: ["maybe", 2, [True]],
             str: [[1], {"a": 1}]}
    return wrong.get(annotation, [[1], {"a": 1}])  # Path


def _train_fields() -> list[tuple[str, str, object]]:
    cases = []
    for section, cls in TRAIN_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for spec in fields(cls):
            cases.extend((section, spec.name, value) for value in _wrong_values(hints[spec.name]))
    return cases


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("section,name,value", _train_fields(), ids=lambda v: str(v)[:20])
def test_every_train_option_of_the_wrong_type_in_yaml_is_one_line(tmp_path, section, name, value):
    import yaml

    config = tmp_path / "my.yaml"
    other = "log_every" if name == "seed" else "seed"  # a valid option before it, so the line is not the first
    config.write_text(f"# my run\ntrain:\n  {other}: 3\n" + yaml.safe_dump({section: {name: value}}).replace(
        "train:\n", ""))
    line = next(number for number, text in enumerate(config.read_text().splitlines(), 1)
                if text.strip().startswith(f"{name}:"))
    message = _one_line_error(CliRunner().invoke(app, ["train", "--config", str(config)]))
    assert f"{config}:{line}: {section}.{name}: expected " in message
    assert "Traceback" not in message


@pytest.mark.parametrize("option,value,expected", [("--train.batch_size", "8.5", "a whole number"),
                                                   ("--train.batch_size", "[8]", "a whole number"),
                                                   ("--train.lr", "fast", "a number"),
                                                   ("--train.compile", "maybe", "true or false"),
                                                   ("--model.decoder_mode", "sideways", "one of full, frozen, lora")])
def test_a_dotted_override_of_the_wrong_type_is_one_line(option, value, expected):
    message = _one_line_error(CliRunner().invoke(app, ["train", option, value]))
    assert f"{option}: expected {expected}, got {value!r}" in message


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  lr: 0.001\n   batch_size: 8\n")  # indented one space too far
    message = _one_line_error(CliRunner().invoke(app, ["train", "--config", str(config)]))
    assert f"{config}:3:" in message and "not valid YAML" in message


def _flag_cases() -> list[tuple[str, str, str]]:
    """(command, flag, wrong value) for every flag that takes a number."""
    cases = []
    group = typer.main.get_command(app)
    commands = {**group.commands, **{f"store {name}": command
                                     for name, command in group.commands["store"].commands.items()}}
    for name, command in commands.items():
        for parameter in command.params:
            if not isinstance(parameter, typer.core.TyperOption) or parameter.is_flag:
                continue
            annotation = parameter.type_descriptor.annotation
            kinds = set(typing.get_args(annotation)) or {annotation}
            if int in kinds:
                cases.extend((name, parameter.opts[0], value) for value in ("128.5", "[8]"))
            elif float in kinds:
                cases.append((name, parameter.opts[0], "fast"))
    return cases


@pytest.mark.parametrize("command,flag,value", _flag_cases())
def test_every_numeric_flag_of_every_command_of_the_wrong_type_is_one_line(command, flag, value):
    message = _one_line_error(CliRunner().invoke(app, [*command.split(), flag, value]))
    assert flag in message and ("integer" in message or "number" in message)
