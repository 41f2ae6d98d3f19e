"""Nested dataclasses from YAML plus ``key=value`` overrides, with every mistake caught at start-up.

A typo in a config (``lr_shedule``) or a value of the wrong type would otherwise surface hours into
a run, or never: a silently ignored key simply trains with the default. So unknown keys are
rejected with the list of valid ones, values are converted to the field's declared type (YAML
reads ``1e-4`` as a string, for instance) and a dataclass's own ``__post_init__`` checks are
reported with the dotted name of the section they came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "sections_from_dict", "to_dict"]

T = TypeVar("T")
_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


class ConfigError(ValueError):
    """A config file or override that cannot describe a run: the message names the key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got a {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` items into a raw config dict; values are parsed as YAML (lists, null...).

    Types are checked later by :func:`from_dict`, exactly as for values from the file, so an
    override cannot slip past the checks a file value gets.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, converting and checking every field."""
    label = where or "the config"
    if isinstance(data, cls):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _known_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(_join(where, k) for k in missing)}"
        )
    values = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{label}: {err}") from None


def sections_from_dict(classes: Mapping[str, type], data: Any, where: str) -> dict[str, Any]:
    """A section of named sub-sections whose names are known only at run time (the registered
    losses): each value is built as its name's dataclass, with every check of :func:`from_dict`.
    Names the data leaves out are left out here; the caller fills in their defaults."""
    data = _known_keys(data, classes, where)
    return {name: from_dict(classes[name], value, _join(where, name)) for name, value in data.items()}


def _known_keys(data: Any, valid: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` as a dict (None: empty) whose keys are all in ``valid``; else the error naming them."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, got {data!r}")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(valid))}"
        )
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 reads a bare no/off/yes/on as a bool
            value = next((w for w in _BOOL_WORDS[value] if w in args), value)
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    section = getattr(tp, "from_config_section", None)
    if section is not None:  # a section whose keys are known only at run time (trainer.losses.LossesConfig)
        return section(value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            item_type = args[0] if args else Any
            items = [_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
            items = [_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return _convert_scalar(tp, value, where)


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a bug in our dataclasses, not the user's
