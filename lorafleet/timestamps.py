"""Kubernetes' timestamp format (RFC 3339, UTC, whole seconds), for the operator's conditions and the embedded API."""

from __future__ import annotations

import datetime


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
