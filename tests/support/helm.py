"""Rendering the chart with Helm's own engine (helm-python-sdk binds Helm v4's Go SDK)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import yaml
from helm_python import _native

CHART = Path(__file__).resolve().parents[2] / "charts" / "lorafleet"


def render(values: dict[str, Any] | None = None, *, name: str = "lorafleet", namespace: str = "lorafleet-system",
           api_versions: list[str] = (), kube_version: str = "v1.32.0") -> list[dict[str, Any]]:
    """Every object `helm install` would apply, in template order (NOTES excluded).

    ``Chart.render`` has no keywords for the cluster's capabilities; the native render it wraps takes
    them (as `helm template --api-versions --kube-version` does), so they go through that call.
    """
    options = {"name": name, "namespace": namespace, "kube_version": kube_version, "api_versions": list(api_versions), "is_install": True}
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values)  # what install does first
        manifests = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)))  # noqa: SLF001
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def notes(values: dict[str, Any] | None = None, namespace: str = "lorafleet-system") -> str:
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values or {}, name="lorafleet", namespace=namespace)["lorafleet/templates/NOTES.txt"]
