"""The command-line options of every stage, made from its settings dataclasses: one option per field (its type
or choices, default and help come from the field), one way to name them, and one path from YAML file and
command line to a validated config (mellow.config.load).

A setting is named by its dotted path (`--encoder.tokens 16`, `--train.optimizer.lr 3e-4`), or by any shorter
form that keeps its last name while that still names one setting (`--tokens 16`, `--train.lr 3e-4`); `-` and
`_` are the same. A stage may add aliases for documented short flags (`--encoder mel` for `--encoder.name`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
import typer.main
from typer._click.exceptions import UsageError  # typer's own click (0.29 vendors it)
from typer.models import ParamMeta

from mellow.config import (
    FALSE_WORDS,
    TRUE_WORDS,
    Layer,
    Names,
    Option,
    checked,
    command_line_layer,
    construct,
    yaml_layer,
)

T = TypeVar("T")


CONFIG_HELP = ("YAML file of settings: the options below, sections as mappings (encoder: {tokens: 16}); options "
               "given on the command line win over it.")


def _metavar(option: Option) -> str:
    annotation = option.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return "[" + "|".join(map(str, typing.get_args(annotation))) + "]"
    return {bool: "[true|false]", int: "INTEGER", float: "NUMBER", Path: "PATH"}.get(annotation, "TEXT")


def _shown_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, Path) else repr(value) if value == "" else str(value)


def _help_option(names: Names, option: Option) -> typer.core.TyperOption:
    """The --help entry of one setting: every spelling the command takes, its type or choices, default and help.
    The values themselves are read by StageCommand.parse_args, which knows the shorter spellings."""
    spellings = [f"--{option.dotted}"] if len(option.path) > 1 else [f"--{option.dotted.replace('_', '-')}"]
    if len(option.path) > 2:  # a component's setting: its section and name (--train.lr for --train.optimizer.lr)
        spellings.append(f"--{option.path[0]}.{option.path[-1]}")
    elif len(option.path) == 2 and names.short(option) != option.dotted:  # --tokens for --encoder.tokens
        spellings.append(f"--{names.short(option).replace('_', '-')}")
    spellings += [f"--{alias.replace('_', '-')}" for alias, target in names.aliases.items() if target == option.dotted]
    panel = f"{'.'.join(option.path[:-1])} options" if len(option.path) > 1 else None
    declared = typer.Option(_shown_default(option.default), *spellings, metavar=_metavar(option), expose_value=False,
                            help=option.help, show_default=True, rich_help_panel=panel)
    # typer's own maker of a click option from a declaration (the one its commands use)
    return typer.main._get_param(ParamMeta(name=option.dotted.replace(".", "__"), default=declared,
                                           annotation=Optional[str]))


BOOL_WORDS = TRUE_WORDS + FALSE_WORDS


def read_settings(args: list[str], names: Names, own: set[str],
                  takes_arguments: bool = False) -> tuple[list[str], dict[str, str]]:
    """Take the settings out of a command line: (what is left for click: the command's own options and its
    arguments, {name as typed: value}). A setting takes one value (`--tokens 16`, `--tokens=16`); a true/false
    one may stand alone (`--overwrite`, `--no-overwrite`, or `--overwrite true`): in a command that takes
    arguments (a dataset folder, a run), a word after it that is not true/false is the next argument, elsewhere
    it is the setting's value (and an error if not true/false). Unknown names are kept, with the value after
    them, for the config to report with the nearest known name."""
    left, given = [], {}
    index = 0
    while index < len(args):
        argument = args[index]
        index += 1
        if argument == "--":
            left.extend(args[index - 1:])
            break
        if not argument.startswith("--") or argument.split("=")[0] in own:
            left.append(argument)
            continue
        name, equals, value = argument[2:].partition("=")
        option = names.find(name)
        if option is None and (name.startswith("no-") or name.startswith("no_")) and not equals:
            negated = names.find(name[3:])
            if negated is not None and negated.annotation is bool:
                given[name[3:]] = "false"
                continue
        if equals:
            given[name] = value
        elif option is not None and option.annotation is bool and (
                index >= len(args) or args[index].startswith("--")
                or (takes_arguments and args[index].lower() not in BOOL_WORDS)):
            given[name] = "true"
        elif index < len(args) and not (option is None and args[index].startswith("--")):
            given[name] = args[index]
            index += 1
        else:
            raise UsageError(f"--{name} needs a value")
    return left, given


def stage(cls: type, aliases: dict[str, str] | None = None) -> type[typer.core.TyperCommand]:
    """The command class of a stage whose settings are `cls`: an option for every setting, made from the
    dataclass fields (type, default, help, choices), read by one rule (StageCommand.parse_args) and handed to
    the command as ctx.meta["settings"], a Layer for config.load."""
    names = Names(cls, aliases)
    shown = [_help_option(names, option) for option in names.options]

    class StageCommand(typer.core.TyperCommand):
        settings_names = names  # for tools that list a stage's settings (tests, docs)

        def __init__(self, *args, params=None, **kwargs) -> None:
            super().__init__(*args, params=[*(params or []), *shown], **kwargs)

        def parse_args(self, ctx, args):
            own = {flag for parameter in self.get_params(ctx) if parameter not in shown
                   for flag in [*parameter.opts, *parameter.secondary_opts]}
            takes_arguments = any(isinstance(p, typer.core.TyperArgument) for p in self.get_params(ctx))
            left, given = read_settings(list(args), names, own, takes_arguments)
            ctx.meta["settings"] = command_line_layer(given)
            ctx.meta["names"] = names
            return super().parse_args(ctx, left)

    return StageCommand


class MissingSetting(ValueError):
    """The setting a stage cannot run without was given nowhere; the message says what it needs."""


def settings(context: typer.Context, cls: type[T], config_file: Path | None,
             arguments: dict[str, object] | None = None, needs: str | None = None,
             fixed: Callable[[dict[tuple[str, ...], Any]], tuple[dict[tuple[str, ...], Any], str]] | None = None) -> T:
    """A stage's settings, by the one config path: defaults, then the --config file, then the command line
    (options, then arguments). `needs`: the message when the setting a stage cannot run without (the first of
    `arguments`) is given nowhere, raised once what was given is known to be well typed. `fixed`: from the values
    given, settings that another one fixes, and the end of the message that refuses a given value contradicting
    one (`01_precompute --like` fixes the encoder's)."""
    layers = [*([yaml_layer(config_file)] if config_file is not None else []), context.meta["settings"]]
    given = {name: value for name, value in (arguments or {}).items() if value is not None}
    layers.append(Layer(given, {name: name.upper() for name in given}))
    names: Names = context.meta["names"]
    values = checked(cls, layers, names.aliases)
    if needs is not None and names.resolve(next(iter(arguments or {}))).path not in values:
        raise MissingSetting(needs)
    if fixed is not None:
        forced, by = fixed(values)
        clashes = [f"--{'.'.join(path)} {values[path]}" + f" (it has {value})" for path, value in forced.items()
                   if path in values and values[path] != value]
        if clashes:
            raise ValueError(f"{', '.join(clashes)}: contradicts {by}")
        values = {**values, **forced}
    return construct(cls, values)
