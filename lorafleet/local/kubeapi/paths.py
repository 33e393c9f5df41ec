"""Parsing Kubernetes API paths, including the ones kmock's parser gets wrong (``/api/v1/namespaces``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ApiPath:
    group: str
    version: str
    plural: str | None = None  # None: the group/version discovery document
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse(path: str, is_namespaced: callable) -> ApiPath | None:
    """``is_namespaced(group, plural)`` tells namespaced resources apart (needed for /namespaces/X/Y)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return ApiPath(group, version)
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and is_namespaced(group, rest[2]):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if len(rest) > 3:
        return None
    return ApiPath(group, version, plural, namespace, name, subresource)
