"""Reading a Prometheus /metrics page in tests: samples by value, keyed as they are written."""

from __future__ import annotations

import httpx


def metric_values(text: str) -> dict[str, float]:
    """Every sample of an exposition, keyed name{label="value",...} as written (unlabelled: the bare name)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric(url: str, name: str) -> float:
    """One series' value from ``url``'s /metrics."""
    return metric_values(httpx.get(url + "/metrics", timeout=5).text)[name]
