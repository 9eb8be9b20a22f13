"""YAML (+ `--set section.key=value` overrides) -> `RunConfig`, with the checks a typo needs.

Unknown keys are refused with the closest known name; values are checked against the field's
type (int, float, str, bool, `Literal[...]`, `X | None`, `dict[K, V]`), and a float must be finite;
a section's own `ValueError` is reported with the section's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ithaca.launcher.config.schema import ConfigError, RunConfig


def resolve_config_path(name: str) -> Path:
    """A path as given, or the name of a shipped config (`debug-cpu` -> configs/debug-cpu.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = resources.files("ithaca.configs") / f"{path.stem}.yaml"
    if not path.suffix or path.parent == Path("."):
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError("--config", name, "no such file; give a YAML path or a shipped config name "
                      f"({', '.join(shipped_config_names())})")


def shipped_config_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("ithaca.configs").iterdir()
                  if p.name.endswith(".yaml"))


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, and build the checked config."""
    path = resolve_config_path(str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", str(path), f"not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", str(path), "the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return build(RunConfig, raw, prefix="")


def apply_override(raw: dict, item: str) -> None:
    """`train.steps=20` -> raw["train"]["steps"] = 20 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError("--set", item, "write section.key=value, e.g. train.steps=20")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(parts[0], section, "a section must be a mapping")
    section[parts[1]] = yaml.safe_load(value)


REPLACED_KEYS = {"eval.passkey": "replaced by eval.metrics: list passkey there, e.g. eval.metrics=[loss,positions,passkey]"}
"""Keys that configs written for earlier versions hold, and what to write instead."""


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and types field by field."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, f"expected a mapping of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if f"{prefix}{key}" in REPLACED_KEYS:
            raise ConfigError(f"{prefix}{key}", raw[key], REPLACED_KEYS[f"{prefix}{key}"])
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}", raw[key], f"unknown key; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = convert(hints[name], raw[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}", None, "required; add it to the config")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section outside launcher/ (the model) raises plain ValueError
        raise ConfigError(where, kwargs, str(err)) from None


def convert(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{name}.")
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return convert(inner, value, name)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(name, value, f"expected a mapping of {key_type.__name__} to {value_type.__name__}")
        return {convert(key_type, k, name): convert(value_type, v, f"{name}.{k}") for k, v in value.items()}
    if origin is tuple:  # tuple[X, ...]: a YAML list
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(name, value, f"expected a list of {item_type.__name__}, e.g. [2, 2]")
        return tuple(convert(item_type, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(name, value, f"choose one of {', '.join(map(repr, choices))}")
        return value
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # PyYAML reads `3e-4` (no dot) as a string
            number = float(value)
        except ValueError:
            raise ConfigError(name, value, "expected a number") from None
        if not math.isfinite(number):  # YAML's .nan/.inf, "nan", "1e999": no field means any of them
            raise ConfigError(name, value, "expected a finite number, not nan or inf")
        return number
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(name, value, f"expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"config field {name} has a type the loader does not know: {hint}")
