"""Settings as data: dataclasses loaded from TOML, overridden by `key=value` strings, written back as TOML.

Unknown keys and values of the wrong type are errors, never silently ignored. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import UserError
from .values import parse_subset


def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config: {name} = {value!r} is not one of {', '.join(allowed)}")


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"config: {name} = {value!r} must be > 0")


def subset(spec: str) -> None:
    """A subset spec is checked before any data is read."""
    parse_subset(spec)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"config: {where or 'top level'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"config: unknown key {where + '.' if where else ''}{unknown[0]}; known keys: {', '.join(sorted(names))}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(hints[k], _over_default(fields[k], v), f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A table given for a nested setting overrides that field's own default, key by key, not its class's defaults:
    `--set optim.lr=0.01` keeps an attack's Adam, where its class alone would say SGD."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    return _merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UserError(f"config: {where} must be {tp.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.1` -> (["optim", "lr"], 0.1); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (for example optim.lr=0.1)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
         sets: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Any:
    """Defaults <- TOML file (less its top-level tables `ignore`) <- `sets` ("a.b=v") <- `overrides` (CLI options
    that were given)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for key in ignore:
            data.pop(key, None)
    for text in sets or []:
        keys, value = parse_override(text)
        _set(data, keys, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key.split("."), value)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise UserError(f"config: {'.'.join(keys)} goes through a key that is not a table")
    data[keys[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Any) -> str:
    return tomli_w.dumps(to_dict(cfg))


