"""Type and range checks for frozen config dataclasses, in one place: every field of a config
(`VLMConfig`, `RunConfig`, ...) is checked against its annotation when the config is built, so a
bad value from a JSON file, a flag or code is one clear error naming the field.

JSON gives `64.0` for an int, `"false"` for a bool and `NaN` for a float; none of those pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


def type_problems(obj: Any) -> list[str]:
    """Fields of dataclass `obj` whose value does not match the annotation."""
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = _check(value, hints[f.name])
        if problem:
            problems.append(f"{f.name} {_show(value)}: {problem}")
    return problems


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value: Any, hint: Any) -> str | None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_check(value, h) for h in options if h is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be finite"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin is tuple or hint is tuple:
        return None if isinstance(value, tuple) else "must be a list"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "must be a JSON object"
    return None


def range_problems(obj: Any, ranges: dict[str, tuple[float | None, float | None]]) -> list[str]:
    """Fields outside [low, high] (None: unbounded on that side; a None value is skipped)."""
    problems = []
    for name, (low, high) in ranges.items():
        value = getattr(obj, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent, or already reported by type_problems
        if low is not None and value < low:
            problems.append(f"{name} {value} must be >= {low}")
        if high is not None and value > high:
            problems.append(f"{name} {value} must be <= {high:,}")
    return problems


def read_utf8(path: str | Path, *, what: str = "") -> str:
    """A text file's contents; one error naming the file when it is missing or not UTF-8."""
    path = Path(path)
    label = f"{what} {path}".strip()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json_object(path: str | Path, *, what: str = "") -> dict:
    """A JSON object from a file; one error naming the file otherwise."""
    label = f"{what} {path}".strip()
    try:
        data = json.loads(read_utf8(path, what=what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: must hold a JSON object, got a {type(data).__name__}")
    return data
