"""Command-line flags derived from a frozen config dataclass, so each knob is declared once.

A command lists its flags as a table of Flag(name, field, help, choices). The dataclass gives
each flag's type (its type hint) and default (its declared default, shown in --help); parsing
back puts only the flags the user gave into the config, so whatever the command starts from
(a base config, or for `semguard serve` the SEMGUARD_* environment) fills the rest.

Only argparse and the standard library are imported here: `semguard --help` must stay light.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semguard.world_cache import DEFAULT_WORLD_CACHE

_SCALARS = (int, float, str, Path)


@dataclass(frozen=True)
class Flag:
    """One flag: `field` is the config field it sets ("detector.k": field k of the nested config
    `detector`); `choices` its allowed values, taken from the constants the config validates with."""

    name: str  # "--references"
    field: str
    help: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """argparse's own dest for the name, so `args.<dest>` is what it was before flags were derived."""
        return self.name.lstrip("-").replace("-", "_")

    def env_name(self, prefix: str) -> str:
        return prefix + self.field.replace(".", "_").upper()


def field_spec(config_type: type, path: str) -> tuple[Any, Any]:
    """(type hint, default) of a dotted field path of a config dataclass; ValueError listing the
    fields when a name is unknown, TypeError when the field has no default."""
    owner, default = config_type, dataclasses.MISSING
    for depth, name in enumerate(path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        if name not in fields:
            raise ValueError(f"field: {getattr(owner, '__name__', owner)} has no field {name!r}; fields: {sorted(fields)}")
        # below the top, the default is the nested config's own value (DetectorEvalConfig ships
        # CalibrationConfig(method="ensemble"), not CalibrationConfig's method)
        inherited = depth > 0 and default is not dataclasses.MISSING
        default = getattr(default, name) if inherited else _declared_default(fields[name])
        owner = typing.get_type_hints(owner)[name]
    if default is dataclasses.MISSING:
        raise TypeError(f"field: {path!r} of {config_type.__name__} has no default; add its flag by hand")
    return owner, default


def _declared_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def boolean(text: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off (any case)."""
    if text.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {text!r}")


def value_parser(hint: Any) -> Callable[[str], Any]:
    """str -> value for a field of type int, float, str, Path, any of them `| None`, or tuple[str, ...]
    (a comma list); TypeError for anything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if len(args) == 1:
            return value_parser(args[0])
    elif typing.get_origin(hint) is tuple and args == [str, Ellipsis]:
        return comma_list
    elif hint in _SCALARS:
        return hint
    elif hint is bool:
        return boolean
    raise TypeError(f"hint: no flag parser for a field of type {hint}; types: {_SCALARS}, X | None, tuple[str, ...]")


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, config_type: type, flags: Sequence[Flag],
                     env_prefix: str | None = None) -> None:
    """Add each flag with its field's type and default (shown in the help); a bool field's flag is a
    switch that sets the opposite of the default. An unset flag parses to None: nothing given."""
    for flag in flags:
        hint, default = field_spec(config_type, flag.field)
        if flag.choices is not None and default not in flag.choices:
            raise ValueError(f"choices: {flag.name}'s default {default!r} is not among {flag.choices}")
        if hint is bool:
            parser.add_argument(flag.name, dest=flag.dest, action="store_true", default=None, help=flag.help)
            continue
        parser.add_argument(flag.name, dest=flag.dest, type=value_parser(hint), choices=flag.choices, default=None,
                            help=_help_text(flag, default, env_prefix))


def _help_text(flag: Flag, default: Any, env_prefix: str | None) -> str:
    if env_prefix is not None:
        note = f"env {flag.env_name(env_prefix)}; default {_shown(default)}"
    else:
        note = f"default: {_shown(default)}"
    return f"{flag.help} ({note})" if flag.help else f"({note})"


def flag_values(args: argparse.Namespace, config_type: type, flags: Sequence[Flag],
                environ: Mapping[str, str] | None = None, env_prefix: str | None = None) -> dict[str, Any]:
    """{field path: value} of the flags given, else (with env_prefix) of <env_prefix><FIELD> in environ."""
    values: dict[str, Any] = {}
    for flag in flags:
        hint, default = field_spec(config_type, flag.field)
        value = getattr(args, flag.dest, None)
        if hint is bool and value is not None:
            value = not default
        if value is None and env_prefix is not None and flag.env_name(env_prefix) in (environ or {}):
            value = _from_environ(flag.env_name(env_prefix), environ[flag.env_name(env_prefix)], hint)
        if value is not None:
            values[flag.field] = value
    return values


def _from_environ(name: str, raw: str, hint: Any) -> Any:
    parse = value_parser(hint)
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {parse.__name__}, got {raw!r}") from None


def with_values(config: Any, values: Mapping[str, Any]) -> Any:
    """dataclasses.replace by dotted path: {"detector.k": 5} replaces config.detector.k; each
    config is rebuilt once, so its validation runs on the final values."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = with_values(top.get(head, getattr(config, head)), inner)
    return dataclasses.replace(config, **top) if top else config


def config_from_flags(args: argparse.Namespace, base: Any, flags: Sequence[Flag]) -> Any:
    """`base` with the field of every flag the user gave replaced by its value."""
    return with_values(base, flag_values(args, type(base), flags))


def add_world_cache_flag(parser: argparse.ArgumentParser, help_text: str, *old_names: str) -> None:
    """--world-cache, the same flag and default wherever a world is read (old_names: former spellings kept)."""
    parser.add_argument("--world-cache", *old_names, dest="world_cache", type=Path, default=DEFAULT_WORLD_CACHE,
                        help=f"{help_text} (default: %(default)s)")


class DeferredParser(argparse.ArgumentParser):
    """A subcommand parser whose arguments can be added on first use (parse or help): deriving
    them imports the command's config dataclass (torch, torchvision, scipy), which `semguard --help`
    and the other commands need not pay for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def complete(self) -> DeferredParser:
        """Add every deferred argument now."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()


def defer_arguments(parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], None]) -> None:
    """add(parser) on the parser's first use when it is a DeferredParser, else now."""
    if isinstance(parser, DeferredParser):
        parser._deferred.append(add)
    else:
        add(parser)


def defer_config_flags(parser: argparse.ArgumentParser, config: str,
                       flags: Sequence[Flag] | Callable[[], Sequence[Flag]]) -> None:
    """The flags of the config dataclass `config` ("package.module:Class", imported on the parser's first
    use: it may import torch), from `flags` (or a function returning them, for tables built on import)."""
    def add(p: argparse.ArgumentParser) -> None:
        module, _, name = config.partition(":")
        add_config_flags(p, getattr(importlib.import_module(module), name), flags() if callable(flags) else flags)

    defer_arguments(parser, add)
