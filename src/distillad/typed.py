"""Settings checked against their dataclass declarations.

Method options, the training config and its optimizer section are dataclasses whose annotations say what each
value is. Values arrive from YAML files, `--option KEY=VALUE` and Python calls, so they are checked (and the few
safe conversions made: an int where a float is declared, a list where a tuple is) here, once, from the
declarations; a wrong type becomes a ConfigError naming the setting, the value and the type expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from distillad.errors import ConfigError


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} numbers"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def coerce(value: Any, kind: Any, name: str) -> Any:
    """`value` as the declared `kind` (bool, int, float, str, None, unions, tuple[...], dict); ConfigError if not."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_type_name(kind)}, got {value!r}")
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(kind)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value   # a type this checker does not know (nested dataclasses are checked by their owner)
    raise ConfigError(f"{name} must be {_type_name(kind)}, got {value!r}")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (they are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def typed_values(cls: type, values: dict[str, Any], source: str, what: str = "setting") -> dict[str, Any]:
    """Check `values` against `cls`'s fields: unknown names and wrong types raise ConfigError naming `source`
    (and calling the names `what`: setting, option)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: unknown {what}(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(types_))}")
    return {key: coerce(value, types_[key], f"{source}: {key}") for key, value in values.items()}
