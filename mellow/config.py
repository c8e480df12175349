"""Typed config dataclasses: one field helper, YAML + dotted overrides, and diffs that name what changed.

Every config field is declared with `setting(default, "help")`; the help text is the CLI help and the docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:
    """A dataclass field whose `help` doubles as CLI help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def cli_option(cls: type, name: str, *flags: str) -> Any:
    """A typer option whose default and help come from the dataclass field `cls.name`."""
    spec = next(f for f in fields(cls) if f.name == name)
    default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
    return typer.Option(default, *flags, help=spec.metadata.get("help", ""))


class ConfigTypeError(ValueError):
    """A config value of the wrong type; the message names where it was given, the option and the type."""


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


WHOLE_NUMBER = re.compile(r"[+-]?\d+")


def _wrong(name: str, expected: str, value: Any) -> ConfigTypeError:
    got = "nothing (null)" if value is None else repr(value)
    return ConfigTypeError(f"{name}: expected {expected}, got {got}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value`, from YAML or the command line, as the field's declared type (a string "8" from the command line
    becomes 8); a ConfigTypeError naming `name`, the type expected and the value for anything else. Nothing is
    rounded or guessed: 128.5 for a whole number, a list for a number and "maybe" for a boolean are errors."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], name)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if not isinstance(value, str) or value not in allowed:
            raise _wrong(name, f"one of {', '.join(map(str, allowed))}", value)
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower() if isinstance(value, (str, int)) else None
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise _wrong(name, "true or false", value)
        return word in TRUE_WORDS
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and WHOLE_NUMBER.fullmatch(value.strip()):
            return int(value)
        raise _wrong(name, "a whole number", value)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(name, "a number", value)
    if annotation in (str, Path):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return annotation(str(value)) if annotation is Path else str(value)
        raise _wrong(name, "a path" if annotation is Path else "text", value)
    return value


def _unknown(key: str, known: dict, prefix: str, where: str | None) -> str:
    """An unknown option, named where it was given, with the nearest known one (or where to find them all)."""
    where = where or f"{prefix}{key}"
    dashes = "--" if where.startswith("--") else ""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {dashes}{prefix}{close[0]}?" if close else "--help lists every option"
    return f"unknown option {where} ({hint})"


def build(cls: type[T], values: dict[str, Any], section: str = "", names: dict[str, str] | None = None) -> T:
    """Make `cls` from a dict, rejecting unknown keys with the list of known ones. `names` says how to name a
    field in an error (where its value was given: "my.yaml:12: train.lr", "--train.lr"); default section.field."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    prefix = f"{section}." if section else ""
    if unknown:
        raise ValueError("; ".join(_unknown(key, known, prefix, (names or {}).get(key)) for key in sorted(unknown)))
    hints = typing.get_type_hints(cls)
    names = names or {}
    converted = {k: _coerce(v, hints[k], names.get(k, prefix + k)) for k, v in values.items()}
    return cls(**converted)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def parse_dotted(args: list[str]) -> dict[str, dict[str, str]]:
    """`--train.lr 3e-4 --model.decoder=tiny` -> {"train": {"lr": "3e-4"}, "model": {"decoder": "tiny"}}."""
    overrides: dict[str, dict[str, str]] = {}
    index = 0
    while index < len(args):
        argument = args[index]
        if not argument.startswith("--") or "." not in argument.split("=")[0]:
            raise ValueError(f"unexpected argument {argument!r}; overrides look like --section.option VALUE")
        key, _, value = argument[2:].partition("=")
        if not _:
            if index + 1 >= len(args):
                raise ValueError(f"{argument} needs a value")
            index += 1
            value = args[index]
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = value
        index += 1
    return overrides


def load_yaml_with_lines(path: Path) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], int]]:
    """The sections of a YAML config file, and the line of each `section: {option: ...}` entry (for errors); a
    file that is not valid YAML is one error naming file, line and column."""
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        loaded = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections (train:, model:, ...)")
    lines: dict[tuple[str, str], int] = {}
    for section_key, section_value in root.value if isinstance(root, yaml.MappingNode) else []:
        if isinstance(section_value, yaml.MappingNode):
            for option_key, _ in section_value.value:
                lines[(str(section_key.value), str(option_key.value))] = option_key.start_mark.line + 1
    for section, entries in loaded.items():
        if entries is not None and not isinstance(entries, dict):
            line = next((n for (s, _), n in lines.items() if s == section), None)
            raise ValueError(f"{path}{f':{line}' if line else ''}: section {section}: expected options "
                             f"(option: value lines indented under it), got {entries!r}")
    return loaded, lines


def describe_differences(expected: dict, actual: dict, prefix: str = "") -> list[str]:
    """Human-readable lines for every key whose value differs between two nested dicts."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        left, right = expected.get(key), actual.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            lines.extend(describe_differences(left, right, f"{prefix}{key}."))
        elif left != right:
            lines.append(f"{prefix}{key}: expected {left!r}, found {right!r}")
    return lines


def help_table(sections: dict[str, type]) -> str:
    """Every option of every section with its default and help, for `--help` epilogs and the README."""
    lines = []
    for section, cls in sections.items():
        for spec in fields(cls):
            default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
            shown = str(default) if isinstance(default, Path) else repr(default)
            lines.append(f"--{section}.{spec.name} (default {shown}): {spec.metadata.get('help', '')}")
    return "\n\n".join(lines)

