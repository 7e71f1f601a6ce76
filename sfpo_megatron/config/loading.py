"""Reading a run configuration: a YAML file + ``key.sub=value`` overrides, each value coerced
to its field's type, renamed keys refused with their new name, then validated."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config.run import Config

RENAMED_KEYS = {"algorithm.sfpo.adaptive": "algorithm.sfpo.switch_to_grpo"}
"""Old dotted key -> its new name: a file or override that uses the old one is an error that
names the new one."""

_FILE_PATHS = (
    ("model", "hf_config"),
    ("data", "train_files"),
    ("data", "tokenizer"),
    ("eval", "files"),
)
"""Keys holding input files, which a config file names relative to itself (and reward.fn's
``path/file.py`` part)."""


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML file (or start from defaults), apply ``key.sub=value`` overrides, validate.

    Relative ``model.hf_config`` paths in a file are taken relative to that file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for old in RENAMED_KEYS:
            if _has_dotted(raw, old):
                _renamed(old, f"{path}: ")
        _resolve_paths(raw, Path(path).resolve().parent)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        if key in RENAMED_KEYS:
            _renamed(key, "override: ")
        _set_dotted(raw, key, yaml.safe_load(value))
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def _renamed(old: str, where: str) -> None:
    raise ConfigError(f"{where}{old} was renamed to {RENAMED_KEYS[old]}")


def _has_dotted(tree: dict[str, Any], key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    reward = raw.get("reward")
    fn = reward.get("fn") if isinstance(reward, dict) else None
    if isinstance(fn, str) and ".py:" in fn:  # a reward function by file path
        path, _, name = fn.rpartition(":")
        if not Path(path).is_absolute():
            reward["fn"] = f"{base / path}:{name}"
    for section, key in _FILE_PATHS:
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node[key]
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[key] = str(base / value)
        elif isinstance(value, list):
            node[key] = [
                str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                for v in value
            ]


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix}{key}'{hint} (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(item, inner, key) for item in value]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint}")
