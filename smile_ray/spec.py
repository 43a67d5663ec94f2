"""Reading configurations: YAML files and `--set key.path=value` overrides.

Errors name the file or the key path, in one line.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from smile_ray.errors import SmileError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; SmileError naming the file on a missing file or bad syntax."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SmileError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SmileError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(data, Mapping):
        raise SmileError(f"{path}: expected a mapping at the top level")
    return dict(data)


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `config` with each `a.b.c=VALUE` set (VALUE parsed as YAML: 16, [4, 16], true, text)."""
    result = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SmileError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. method.gate_k=16")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise SmileError(f"--set {item!r}: the value is not valid YAML") from None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SmileError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return result
