"""YAML recipe -> typed dataclass, with command-line flags on top (flags > YAML > defaults).

Each concern defines its own dataclass next to the code that uses it (``TrainConfig`` in
``mlx_med/train/config.py``, and so on); this module only knows how to fill one from YAML and flags. Unknown
keys and wrong types are errors that name the file, the line and the key. No mlx here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mlx_med.errors import ConfigError
from mlx_med.resources import is_shipped, localize_shipped_paths

T = TypeVar("T")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Build ``cls`` from a YAML file and flag overrides.

    Args:
        cls: a dataclass; nested dataclass fields are YAML mappings.
        path: the YAML file, or None for defaults only.
        overrides: flag values keyed by dotted field path (``"lora.rank"``); None values are ignored
            so that unset click options do not clobber the YAML.
        section: read only this top-level key of the YAML (a pipeline file holds several stages).

    Raises:
        ConfigError: naming file, line and key for unknown keys, wrong types or bad YAML.
    """
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    where = "<flags>"
    if path is not None:
        path = Path(path)
        where = str(path)
        raw, lines = _read_yaml(path)
        if is_shipped(path):  # its data/ and configs/ paths name the shipped files, from any folder
            raw = localize_shipped_paths(raw)
        if section is not None:
            if section not in raw:
                raise ConfigError(f"{path}: no '{section}:' section")
            if not isinstance(raw[section], dict):
                raise ConfigError(f"{path}:{lines.get((section,), '?')}: '{section}' must be a mapping")
            raw = raw[section]
            lines = {k[1:]: v for k, v in lines.items() if k[:1] == (section,) and len(k) > 1}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        lines.pop(tuple(keys), None)
    return _build(cls, raw, (), where, lines)


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-able data (Paths become strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def dump_config(obj: Any) -> str:
    return yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(root, ())
    return data, lines


def _build(cls: type[T], raw: Any, prefix: tuple[str, ...], where: str, lines: dict) -> T:
    def locate(key: tuple[str, ...]) -> str:
        line = lines.get(key)
        return f"{where}:{line}" if line else where

    if not isinstance(raw, dict):
        raise ConfigError(f"{locate(prefix)}: '{'.'.join(prefix)}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = (*prefix, str(key))
        name = str(key).replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{locate(full)}: unknown key '{'.'.join(full)}' (known keys: {known})")
        kwargs[name] = _coerce(hints[name], value, full, where, lines, locate)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{locate(prefix)}: {err}") from None


def _coerce(hint: Any, value: Any, key: tuple[str, ...], where: str, lines: dict, locate) -> Any:
    name = ".".join(key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key, where, lines)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where, lines, locate)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if errors else f"{locate(key)}: bad value for '{name}'")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{locate(key)}: '{name}' must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{locate(key)}: '{name}' must be a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, key, where, lines, locate) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{locate(key)}: '{name}' must be a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{locate(key)}: '{name}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{locate(key)}: '{name}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{locate(key)}: '{name}' must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{locate(key)}: '{name}' must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{locate(key)}: '{name}' must be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan/inf pass every range check (nan < 0 is False): refuse them here
            raise ConfigError(f"{locate(key)}: '{name}' must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{locate(key)}: '{name}' must be a string, got {value!r}")
        return str(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{locate(key)}: '{name}' must be a path, got {value!r}")
        return Path(value).expanduser()
    return value
