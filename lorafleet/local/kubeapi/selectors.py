"""Label and field selectors, as the API server parses them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]
_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector(selector: str | None) -> Predicate:
    if not selector:
        return lambda obj: True
    tests: list[Predicate] = []
    labels = lambda obj: (obj.get("metadata") or {}).get("labels") or {}  # noqa: E731
    for term in _split(selector):
        match = _SET.match(term)
        if match:
            key, op, values = match[1], match[2], {v.strip() for v in match[3].split(",") if v.strip()}
            if op == "in":
                tests.append(lambda o, k=key, v=values: labels(o).get(k) in v)
            else:
                tests.append(lambda o, k=key, v=values: labels(o).get(k) not in v)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda o, k=key, v=value: labels(o).get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda o, k=key, v=value: labels(o).get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda o, k=term[1:].strip(): k not in labels(o))
        else:
            tests.append(lambda o, k=term: k in labels(o))
    return lambda obj: all(test(obj) for test in tests)


def _dotted(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def field_selector(selector: str | None) -> Predicate:
    if not selector:
        return lambda obj: True
    tests: list[Predicate] = []
    for term in _split(selector):
        negate = "!=" in term
        key, value = (s.strip() for s in (term.split("!=", 1) if negate else term.replace("==", "=").split("=", 1)))

        def test(obj: dict[str, Any], k: str = key, v: str = value, n: bool = negate) -> bool:
            actual = _dotted(obj, k)
            text = "" if actual is None else (str(actual).lower() if isinstance(actual, bool) else str(actual))
            return (text != v) if n else (text == v)

        tests.append(test)
    return lambda obj: all(test(obj) for test in tests)
