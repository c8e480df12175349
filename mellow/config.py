"""Typed config dataclasses: one field helper, YAML + dotted overrides, and diffs that name what changed.

Every config field is declared with `setting(default, "help")`; the help text is the CLI help and the docs.
"""

from __future__ import annotations

import dataclasses
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


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a string from the command line or YAML into the field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Path": Path})  # postponed annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], name)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if annotation is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}={value!r} is not a boolean; use true or false")
        return value.lower() in ("true", "1", "yes")
    if annotation in (int, float, str, Path) and not isinstance(value, annotation):
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a valid {annotation.__name__}") from None
    return value


def build(cls: type[T], values: dict[str, Any], section: str = "") -> T:
    """Make `cls` from a dict, rejecting unknown keys with the list of known ones."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        prefix = f"{section}." if section else ""
        raise ValueError(f"unknown option(s) {', '.join(prefix + u for u in sorted(unknown))}; "
                         f"known: {', '.join(prefix + k for k in known)}")
    hints = typing.get_type_hints(cls)
    converted = {k: _coerce(v, hints[k], f"{section}.{k}" if section else k) for k, v in values.items()}
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


def load_yaml(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    with open(path) as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections (train:, model:, ...)")
    return loaded


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
