"""Typed settings objects: what a command, a queued job and a dashboard form all build and pass around.

A settings class is a dataclass that also inherits `Settings`; its `__post_init__` calls
`check_types()` (a value of the wrong type, or a non-finite number, is named) and then checks ranges.
`from_dict` refuses unknown keys and builds nested settings. `to_dict` is plain JSON, so a job row, a recipe file and a form hold the same thing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import types
import typing

from boomerang.errors import BoomerangError

_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


class Settings:
    """Mixin for settings dataclasses: `to_dict` / `from_dict` with type checks."""

    __dataclass_fields__: typing.ClassVar[dict[str, typing.Any]]  # every subclass is a dataclass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])

    @classmethod
    def from_dict(cls, data, *, source: str | None = None):
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise BoomerangError(f"{where}settings are a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BoomerangError(f"{where}unknown keys {unknown}; valid keys: {sorted(known)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise BoomerangError(f"{where}missing {', '.join(missing)}: required settings")
        values = {}
        for name, value in data.items():
            nested = _settings_class(hints[name])
            values[name] = nested.from_dict(value, source=source) if nested and isinstance(value, dict) else value
        try:
            return cls(**values)
        except BoomerangError as exc:
            raise BoomerangError(f"{where}{exc}") from None


def _settings_class(kind):
    for option in typing.get_args(kind) or (kind,):
        if isinstance(option, type) and issubclass(option, Settings):
            return option
    return None


def check_type(name: str, value, kind) -> None:
    """Raise a BoomerangError naming `name` and `value` unless `value` is of type `kind` (a type hint)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if any(_fits(value, option) for option in options):
        return
    if isinstance(value, float) and not math.isfinite(value) and any(o is float for o in options):
        raise BoomerangError(f"{name} must be a finite number, got {value}")
    wanted = " or ".join(_describe(o) for o in options)
    raise BoomerangError(f"{name} must be {wanted}, got {json.dumps(value, default=str)[:60]}")


def _fits(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is typing.Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1] or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if isinstance(kind, type) and issubclass(kind, Settings):
        return isinstance(value, kind)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _describe(kind) -> str:
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) in (list, tuple):
        (item,) = typing.get_args(kind)[:1] or (typing.Any,)
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    return _SCALARS.get(kind, getattr(kind, "__name__", str(kind)))


def field_docs(cls) -> dict[str, str]:
    """The docstrings under a dataclass's fields (the one place a setting is described)."""
    tree = ast.parse(inspect.getsource(cls))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef), cls
    body, docs = node.body, {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


# ----------------------------------------------------------------------------- command-line flags from fields


def _flag_type(kind):
    """(argparse type, is a list, is a bool) of a field's type hint; Optional[X] is X."""
    options = [o for o in (typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType)
                           else (kind,)) if o is not type(None)]
    kind = options[0] if options else str
    if typing.get_origin(kind) in (list, tuple):
        return str, True, False
    return ({int: int, float: float}.get(kind, str)), False, kind is bool


def add_flags(parser: argparse.ArgumentParser, cls, *, positional: tuple[str, ...] = (), skip: tuple[str, ...] = (),
              aliases: dict[str, str] | None = None, title: str | None = None) -> None:
    """One flag per field of the settings class `cls` (nested settings classes flattened into their fields):
    `--field-name`, its type from the hint, its help from the field's docstring with the default.

    A flag left out is absent from the parsed namespace (`values_from_args` then leaves the class's default); a
    list field takes comma-separated values and may be repeated; a bool field is `--x` / `--no-x`; a field in
    `positional` is a positional argument; `aliases` adds a second spelling (`{"references": "--reference"}`)."""
    hints, docs, aliases = typing.get_type_hints(cls), field_docs(cls), aliases or {}
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        nested = _settings_class(hints[f.name])
        if nested:
            add_flags(parser, nested, skip=skip, aliases=aliases)
            continue
        kind, many, switch = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = docs.get(f.name, "") + ("" if default in (None, [], "") else f" (default: {default})")
        text = text.replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, type=kind, help=text)
            continue
        names = ["--" + f.name.replace("_", "-"), *([aliases[f.name]] if f.name in aliases else [])]
        if switch:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        elif many:
            group.add_argument(*names, dest=f.name, action="append", default=argparse.SUPPRESS, metavar="A,B",
                               help=text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS, help=text)


def values_from_args(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that the command line set (see `add_flags`), nested settings as dicts, lists split on
    commas; a settings dict for `cls.from_dict`."""
    hints, given = typing.get_type_hints(cls), vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        nested = _settings_class(hints[f.name])
        if nested:
            inner = values_from_args(args, nested)
            if inner:
                out[f.name] = inner
        elif f.name in given:
            value = given[f.name]
            if _flag_type(hints[f.name])[1] and isinstance(value, list):
                value = [item.strip() for chunk in value for item in str(chunk).split(",") if item.strip()]
            out[f.name] = value
    return out
