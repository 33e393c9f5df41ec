"""Refusing JSON values no field of any route can use, before any route sees them.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``1e999`` (which becomes infinity) and strings
with lone UTF-16 surrogates (``"\\ud800"``), and it recurses once per nesting level. Each of these
once reached the engine or an encoder and failed there — a NaN temperature failed a whole batch;
a surrogate adapter id failed while being written as a metric label; a deeply nested body ran out
of stack. Checking every value once here fixes the class for every field of every route, and the
error names the field (``parameters.temperature``) as a per-field check would.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 32


class UnusableValue(ValueError):
    """A JSON value no field accepts; the message names where it is."""


def _where(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def check_values(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise UnusableValue for a non-finite number, an unencodable string, or nesting past ``max_depth``."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            raise UnusableValue(f"`{_where(path[:max_depth])}` is nested deeper than {max_depth} levels")
        if isinstance(item, float):
            if not math.isfinite(item):
                raise UnusableValue(f"`{_where(path)}` must be a finite number, got {item!r}")
        elif isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))


def _check_text(text: str, path: list[str | int]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnusableValue(f"`{_where(path)}` is not valid Unicode (a lone surrogate at character {exc.start})") from None
