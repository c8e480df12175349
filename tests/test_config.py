"""Config mistakes are one line, never a traceback: every option of every config given a value of the wrong type
(in a YAML file, as a dotted override, or as a command-line flag) and a YAML file that is not valid YAML each get
one line naming the file and line (for YAML), the option and the type it expects."""

from __future__ import annotations

import typing

import pytest
import typer
from typer.testing import CliRunner

from mellow.cli import app
from mellow.config import options_of
from mellow.settings import TrainJob


def _wrong_values(annotation) -> list:
    """Values of another type than `annotation` allows, as YAML would give them."""
    if typing.get_origin(annotation) in (typing.Union, typing.types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return ["nonsense", [1]]
    wrong = {int: [128.5, [8], "eight", True], float: [[0.5], "fast", {"a": 1}, False], bool: ["maybe", 2, [True]],
             str: [[1], {"a": 1}]}
    return wrong.get(annotation, [[1], {"a": 1}])  # Path


def _train_fields() -> list[tuple[str, object]]:
    return [(option.dotted, value) for option in options_of(TrainJob) for value in _wrong_values(option.annotation)]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("dotted,value", _train_fields(), ids=lambda v: str(v)[:24])
def test_every_train_option_of_the_wrong_type_in_yaml_is_one_line(tmp_path, dotted, value):
    import yaml

    config = tmp_path / "my.yaml"
    *sections, name = dotted.split(".")
    other = "log_every" if name == "seed" else "seed"  # a valid option before it, so the line is not the first
    nested: object = value
    for section in reversed(sections):
        nested = {section: nested if isinstance(nested, dict) and section != sections[-1] else {name: value}
                  if section == sections[-1] else nested}
    config.write_text(f"# my run\ntrain:\n  {other}: 3\n" + yaml.safe_dump(nested).replace("train:\n", "", 1))
    line = next(number for number, text in enumerate(config.read_text().splitlines(), 1)
                if text.strip().startswith(f"{name}:"))
    message = _one_line_error(CliRunner().invoke(app, ["train", "--config", str(config)]))
    assert f"{config}:{line}: {dotted}: expected " in message
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
    """(command, flag, wrong value) for every option that takes a number: every setting of every stage (by its
    first spelling in --help), and the hand-made options of the store tools."""
    cases = []
    group = typer.main.get_command(app)
    commands = {**group.commands, **{f"store {name}": command
                                     for name, command in group.commands["store"].commands.items()}}
    for name, command in commands.items():
        names = getattr(command, "settings_names", None)
        kinds_of = {}
        for parameter in command.params:
            if not isinstance(parameter, typer.core.TyperOption) or parameter.is_flag:
                continue
            if names is not None:  # a stage: the setting's own type, whatever the help option's is
                option = next((o for o in names.options if f"--{o.dotted}" == parameter.opts[0]
                               or f"--{o.dotted.replace('_', '-')}" == parameter.opts[0]), None)
                kinds_of[parameter.opts[0]] = {option.annotation} if option is not None else set()
            else:
                annotation = parameter.type_descriptor.annotation
                kinds_of[parameter.opts[0]] = set(typing.get_args(annotation)) or {annotation}
        for flag, kinds in kinds_of.items():
            if int in kinds:
                cases.extend((name, flag, value) for value in ("128.5", "[8]"))
            elif float in kinds:
                cases.append((name, flag, "fast"))
    return cases


@pytest.mark.parametrize("command,flag,value", _flag_cases())
def test_every_numeric_flag_of_every_command_of_the_wrong_type_is_one_line(command, flag, value):
    message = _one_line_error(CliRunner().invoke(app, [*command.split(), flag, value]))
    assert flag in message and ("integer" in message or "number" in message)


def test_a_section_named_like_a_short_flag_and_misspelt_names_in_any_stage(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("encoder:\n  tokens: 8\n  nme: mel\nstore:\n  root: /tmp/s\n")
    message = _one_line_error(CliRunner().invoke(app, ["precompute", "nowhere", "--config", str(nested)]))
    assert f"unknown option {nested}:3: encoder.nme (did you mean encoder.name?)" in message
    short = tmp_path / "short.yaml"  # `encoder: mel` is the --encoder short flag: encoder.name
    short.write_text("encoder: mel\n")
    message = _one_line_error(CliRunner().invoke(app, ["precompute", str(tmp_path / "nowhere"), "--config",
                                                       str(short)]))
    assert "no audio.jsonl there" in message  # the settings were good; the dataset is what is missing
    typo = tmp_path / "typo.yaml"
    typo.write_text("encodr:\n  tokens: 3\n")
    message = _one_line_error(CliRunner().invoke(app, ["precompute", "nowhere", "--config", str(typo)]))
    assert f"unknown section {typo}:1: encodr (did you mean encoder?)" in message
    message = _one_line_error(CliRunner().invoke(app, ["train", "--trian.lr", "3"]))
    assert message == "error: unknown option --trian.lr (did you mean --train.lr?)"
    message = _one_line_error(CliRunner().invoke(app, ["precompute", "nowhere", "--tokns", "4"]))
    assert message == "error: unknown option --tokns (did you mean --tokens?)"


def test_resume_takes_the_run_folder_a_config_file_names(tmp_path, monkeypatch):
    from mellow.config import Layer
    from mellow.train.runs import train_settings

    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  store: {tmp_path}\n  run_dir: {run}\n  optimizer:\n    lr: 0.0007\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"train:\n  run_dir: {run}\n")
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: the most recent run would be none
    job = train_settings(Layer({}, {}), preset, resume=True)
    assert job.train.run_dir == run and job.train.optimizer.lr == 0.0007  # the run's saved config, read
