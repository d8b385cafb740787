"""Typed params from YAML: frozen dataclasses built from nested dicts, every value checked once.

:func:`build` instantiates a dataclass tree from a plain dict, converting and checking each value
against its type hint (int→float where a float is wanted, a scalar where a list is wanted) and
rejecting unknown keys; :func:`read_params` reads a params file; :func:`apply_overrides` applies
``key.sub=value`` overrides (the syntax of ``dvc exp run -S``). Every problem is one
:class:`ConfigError` line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from debias.errors import DebiasError


class ConfigError(DebiasError):
    """A params.yaml / override problem, reported in one line."""


def require(ok: bool, key: str, message: str) -> None:
    """ConfigError ``key: message`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def one_of(value: Any, allowed: typing.Iterable[str], key: str) -> None:
    """ConfigError naming ``key`` and the allowed names unless ``value`` is one of them."""
    allowed = tuple(allowed)
    require(value in allowed, key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; accept such exponent literals as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting int→float and list→list of items."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return build(hint, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `-S sample.steps=10` means [10]
        require(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
    elif hint is float:
        value = _yaml11_float(value)
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        value = float(value)
        require(value == value and abs(value) != float("inf"), key, "must be finite")
    elif hint is str:
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        require(key in names, f"{prefix}{key}", f"unknown key; allowed: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: {err}") from None


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (values parsed as YAML, as ``dvc exp run -S``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        except RecursionError:
            raise ConfigError(f"override {dotted.strip()!r}: value nested too deeply") from None
        node = raw
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return raw


def read_params(path: str | Path) -> Any:
    """The YAML document of a params file; ConfigError for a missing, unreadable or invalid file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read params file {path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a params file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    return raw


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nest of mappings as one dict of dotted keys (``{"train": {"steps": 5}}`` → ``{"train.steps": 5}``),
    the names ``-S key=value`` and `dvc exp show` use."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
