"""Typed configuration: YAML mappings checked against dataclasses on load.

A bad value gets one ``ConfigError`` naming the key (``train.lr: expected a
number, got 'fast'``), never a traceback from deep inside the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has a bad value."""


def from_dict(cls, data, where: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_key(where, unknown[0])}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        key = _key(where, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{where or 'config'}: {exc}") from None
    return obj


def load(cls, path: str | Path):
    """Read YAML ``path`` into dataclass ``cls``."""
    return from_dict(cls, read_yaml(path))


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path`` (an empty file is ``{}``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict, items, source: str = "--set") -> dict:
    """``raw`` with dotted ``KEY=VALUE`` overrides applied (a new dict; ``raw`` is unchanged).

    ``optim.lr=0.05`` sets ``raw["optim"]["lr"]``; values are YAML
    (``null``, ``true``, ``[1, 2]``), numbers in any notation (``1e-3``).
    Type checks happen later, when the result is validated.
    """
    out = json.loads(json.dumps(raw, default=str))
    for item in items:
        key, sep, text = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise ConfigError(f"{source}: expected KEY=VALUE with a dotted KEY, got {item!r}")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = parse_yaml_value(text.strip())
    return out


def parse_yaml_value(text: str):
    """A command-line value as YAML, with numbers in any notation: ``"1e-3"`` -> 0.001."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    return parse_value(value) if isinstance(value, str) else value


def to_dict(obj) -> dict:
    """A dataclass config as plain data (lists and mappings), as it would be written in YAML."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def digest(data) -> str:
    """SHA-256 (hex, 16 digits) of ``data``'s canonical JSON: equal configs, equal digests."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(a, b, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key), b.get(key), _key(where, str(key)))
        return out
    return [] if a == b else [f"{where or 'config'}: {a!r} -> {b!r}"]


def parse_value(text: str):
    """A command-line value: ``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_key_values(items, source: str) -> dict:
    """``["r=8", "mode=reference"]`` -> ``{"r": 8, "mode": "reference"}``; ``source`` names the origin in errors."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: expected key=value, got {item!r}")
        params[key.strip()] = parse_value(value.strip())
    return params


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = parse_value(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value
