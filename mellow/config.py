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


def setting(default: Any, help: str, *, on_resume: bool = False) -> Any:
    """A dataclass field whose `help` is its command-line help and its docs. `on_resume=True` marks a training
    setting that may differ when a run resumes (where things are, how often to log or save, when to stop); a
    resume that changes any other one is refused, since it would change the training."""
    metadata = {"help": help, "on_resume": on_resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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
        if isinstance(value, (str, int, float, Path)) and not isinstance(value, bool):
            return annotation(str(value)) if annotation is Path else str(value)
        raise _wrong(name, "a path" if annotation is Path else "text", value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A config as nested plain dicts (sections as dicts, paths as text): what runs save and compare."""
    return _plain(dataclasses.asdict(config))


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as one level of dotted names: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(entry) for key, entry in value.items()}
    return str(value) if isinstance(value, Path) else value


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


def is_section(annotation: Any) -> bool:
    """A field whose type is itself a config dataclass: a section (encoder:, store:, train.optimizer:)."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@dataclasses.dataclass(frozen=True)
class Option:
    """One leaf setting of a config tree: its path (("encoder", "tokens")), type, default and help."""

    path: tuple[str, ...]
    annotation: Any
    default: Any
    help: str
    on_resume: bool

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def options_of(cls: type, prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every leaf setting of `cls`, sections walked depth first, in declaration order."""
    found = []
    hints = typing.get_type_hints(cls)
    for spec in fields(cls):
        annotation = hints[spec.name]
        if is_section(annotation):
            found.extend(options_of(annotation, (*prefix, spec.name)))
            continue
        default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
        found.append(Option((*prefix, spec.name), annotation, default, spec.metadata.get("help", ""),
                            spec.metadata.get("on_resume", False)))
    return found


def _is_subsequence(parts: list[str], path: tuple[str, ...]) -> bool:
    remaining = iter(path)
    return all(part in remaining for part in parts)


class Names:
    """How a stage's settings may be named: the full dotted path (`encoder.tokens`, `train.optimizer.lr`), or any
    shorter form that keeps the last name and drops section names while it still names one setting
    (`tokens`, `train.lr`); `-` and `_` are the same; `aliases` add names for documented short flags
    (`encoder` for `encoder.name`)."""

    def __init__(self, cls: type, aliases: dict[str, str] | None = None) -> None:
        self.options = options_of(cls)
        self.by_path = {option.dotted: option for option in self.options}
        self.aliases = {key.replace("-", "_"): value for key, value in (aliases or {}).items()}

    def find(self, name: str) -> Option | None:
        """The setting `name` names, or None where none or several do."""
        try:
            return self.resolve(name)
        except ValueError:
            return None

    def resolve(self, name: str, where: str | None = None) -> Option:
        """The setting `name` names; a ValueError naming `where` (how it was given) if none or several do."""
        key = name.replace("-", "_")
        key = self.aliases.get(key, key)
        if key in self.by_path:
            return self.by_path[key]
        parts = key.split(".")
        matches = [o for o in self.options if o.path[-1] == parts[-1] and _is_subsequence(parts, o.path)]
        if len(matches) == 1:
            return matches[0]
        where = where or f"--{name}"
        if matches:
            raise ValueError(f"{where} is ambiguous: give one of {', '.join(o.dotted for o in matches)}")
        raise ValueError(self.unknown(name, where))

    def sections(self) -> set[str]:
        """Every section's dotted name (`train`, `train.optimizer`, `encoder`)."""
        return {".".join(o.path[:depth]) for o in self.options for depth in range(1, len(o.path))}

    def is_section(self, name: str) -> bool:
        """Whether `name` is a section (`train`, `encoder`, `train.optimizer`), not a setting."""
        return any(o.dotted.startswith(name.replace("-", "_") + ".") for o in self.options)

    def short(self, option: Option) -> str:
        """The shortest name of `option`: its last name alone where no other setting has it."""
        if sum(o.path[-1] == option.path[-1] for o in self.options) == 1:
            return option.path[-1]
        return option.dotted

    def unknown(self, name: str, where: str) -> str:
        """An unknown option, named where it was given, with the nearest known one in the same section (or where
        to find them all)."""
        *sections, last = name.replace("-", "_").split(".")
        candidates = {o.path[-1] for o in self.options if _is_subsequence(sections, o.path[:-1])}
        if not sections:
            candidates |= set(self.aliases)
        close = difflib.get_close_matches(last, sorted(candidates), n=1, cutoff=0.6)
        if close:
            nearest = ".".join([*sections, close[0]])
        else:  # a misspelt section: the nearest full or section + last name
            spellings = {o.dotted for o in self.options} | {f"{o.path[0]}.{o.path[-1]}" for o in self.options}
            close = difflib.get_close_matches(name.replace("-", "_"), sorted(spellings), n=1, cutoff=0.75)
            if not close or not sections:
                return f"unknown option {where} (--help lists every option)"
            nearest = close[0]
        nearest = nearest.replace("_", "-") if "-" in name else nearest
        return f"unknown option {where} (did you mean {'--' if where.startswith('--') else ''}{nearest}?)"


@dataclasses.dataclass
class Layer:
    """Values of one source of settings (a YAML file, a run's saved config, the command line): name -> value,
    and how to name each one in an error ("my.yaml:12: train.lr", "--train.lr")."""

    values: dict[str, Any]
    where: dict[str, str]


def yaml_layer(path: Path, option: str = "--config") -> Layer:
    """A YAML config file as a Layer: its mapping as it is (sections nested), every key named by file and line."""
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        loaded = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if loaded is None:
        return Layer({}, {})
    if not isinstance(loaded, dict):
        raise ValueError(f"{option} {path}: expected a mapping of options and sections (train:, model:, ...)")
    where: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:  # the line of every key, at every depth
        for key_node, value_node in node.value:
            name = f"{prefix}{key_node.value}"
            where[name] = f"{path}:{key_node.start_mark.line + 1}: {name}"
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, f"{name}.")

    walk(root, "")
    return Layer(loaded, where)


def from_dict(cls: type[T], values: dict, where: str) -> T:
    """`cls` from a saved dict of settings (a checkpoint's model: section), through the one config path."""
    return load(cls, [Layer(values, {name: f"{where}: {name}" for name in flatten(values)})])


def from_names(cls: type[T], **settings: Any) -> T:
    """`cls` from settings named as on the command line (`from_names(TrainConfig, lr=3e-4, batch_size=8)`: the
    short names of nested settings), through the one config path."""
    return load(cls, [Layer(settings, {name: name for name in settings})])


def command_line_layer(given: dict[str, Any]) -> Layer:
    """Options given on the command line (their names as typed, without the dashes) as a Layer."""
    return Layer(dict(given), {name: f"--{name}" for name in given})


def load(cls: type[T], layers: list[Layer], aliases: dict[str, str] | None = None) -> T:
    """The one config path: `cls`'s defaults, overlaid by each layer in turn (a YAML preset, a run's saved config,
    the command line), every value checked against its field's type; every unknown or badly typed option is
    reported at once, named where it was given."""
    return construct(cls, checked(cls, layers, aliases))


def checked(cls: type, layers: list[Layer], aliases: dict[str, str] | None = None) -> dict[tuple[str, ...], Any]:
    """{path: value} of every setting the layers give (the last one to name a setting wins), each converted to its
    field's type; a ValueError listing every unknown name and every value of the wrong type."""
    names = Names(cls, aliases)
    chosen: dict[tuple[str, ...], tuple[Any, str]] = {}
    problems = []
    for layer in layers:
        for name, value, where in _entries(layer, layer.values, "", names, problems):
            try:
                option = names.resolve(name, where)
                chosen[option.path] = (_coerce(value, option.annotation, where), where)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    return {path: value for path, (value, _) in chosen.items()}


def _entries(layer: Layer, values: dict, prefix: str, names: Names, problems: list[str]):
    """(name, value, where) of every setting a layer gives: a section's mapping is entered (`train: {lr: 1}` gives
    train.lr); a mapping given where no section is, and a section given one value, are problems."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        where = layer.where.get(name, name)
        section = names.is_section(name) and (isinstance(value, dict) or name.replace("-", "_") not in names.aliases)
        if isinstance(value, dict) and (section or not prefix and names.find(name) is None):
            if not section:
                close = difflib.get_close_matches(name, sorted(names.sections()), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"sections: {', '.join(sorted(names.sections()))}"
                problems.append(f"unknown section {where} ({hint})")
                continue
            yield from _entries(layer, value, f"{name}.", names, problems)
        elif section:
            if value is not None:  # `model:` with nothing under it is no setting at all
                problems.append(f"{where}: {name} is a section; expected options (option: value lines indented "
                                f"under it, or --{name}.<option> VALUE), got {value!r}")
        else:
            yield name, value, where


def construct(cls: type[T], values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = (),
              base: Any = None) -> T:
    """`cls` from leaf values by path: sections built first (from their default, so a section default such as
    align's optimizer keeps its own defaults), then `cls` itself, whose checks run once."""
    hints = typing.get_type_hints(cls)
    arguments = {}
    for spec in fields(cls):
        path = (*prefix, spec.name)
        if is_section(hints[spec.name]):
            default = spec.default_factory() if spec.default_factory is not MISSING else hints[spec.name]()
            inside = {p: v for p, v in values.items() if p[: len(path)] == path}
            arguments[spec.name] = construct(hints[spec.name], inside, path, default) if inside else default
        elif path in values:
            arguments[spec.name] = values[path]
    if base is not None:
        return dataclasses.replace(base, **arguments)
    return cls(**arguments)


def flat(config: Any) -> dict[str, Any]:
    """A config as {dotted name: value}, paths as text: what a run saves and compares."""
    return {option.dotted: _value_at(config, option.path) for option in options_of(type(config))}


def _value_at(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return str(config) if isinstance(config, Path) else config
