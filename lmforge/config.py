"""Dataclass configs: load from YAML, apply dotted overrides (`train.lr=3e-4`), validate, dump.

A config is a tree of dataclasses. Every field carries its help text in `field(metadata={"help": ...})`
(use `opt(default, "help")`), so `lmforge <cmd> --help` is generated from the code and cannot drift.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .core.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help string; mutable defaults are copied per instance."""
    meta = {"help": help}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kwargs)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta, **kwargs)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's declared type; raise ConfigError naming the key."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(inner, '__name__', inner)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, key + ".")
    origin = get_origin(tp)
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer") from None
        if f != int(f):
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under {prefix.rstrip('.') or 'the root'}: "
            + ", ".join(sorted(names))
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> Any:
    """A config tree as plain dicts/lists (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node_cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "the root"
            raise ConfigError(f"unknown config key {dotted!r}; valid keys under {where}: {', '.join(sorted(names))}")
        tp = _is_optional(_hints(node_cls)[part])[1]
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw != "" else ""
            if tp is str and not isinstance(node[part], str):
                node[part] = raw  # keep strings like "1e-3" or "007" verbatim for str fields
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section: cannot set {dotted!r}")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_cls = child, tp


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from defaults ← YAML file ← `key.sub=value` overrides, validating every key."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path)
    return build_config(cls, tree, overrides)


def build_config(cls: type[T], tree: dict[str, Any], overrides: list[str] | None = None) -> T:
    """Build `cls` from a mapping (as read from YAML) plus dotted overrides."""
    import copy

    tree = copy.deepcopy(tree)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, cls, key.strip(), raw)
    return _build(cls, tree)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError naming the file when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def iter_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for `--help`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = _is_optional(hints[f.name])[1]
        if dataclasses.is_dataclass(tp):
            rows.extend(iter_help(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
