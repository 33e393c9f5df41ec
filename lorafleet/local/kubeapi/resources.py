"""What resources exist: kmock's bundled catalog of built-ins plus every CustomResourceDefinition created.

Also what the catalog implies: discovery documents for kubectl and the clients, schema defaults
for custom objects, the scale subresource's paths, and server-side Table rendering from
``additionalPrinterColumns``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ResourceDef:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    shortnames: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: set[str] = field(default_factory=set)
    scale_spec_path: str = ".spec.replicas"
    scale_status_path: str = ".status.replicas"
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    versions: list[str] = field(default_factory=list)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


class Registry:
    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], ResourceDef] = {}

    def load_bundled(self) -> None:
        """The built-in resources, from the catalog kmock ships (taken from a real cluster)."""
        from kmock import ResourcesArray

        catalog = ResourcesArray()
        catalog.load_bundled()
        for resource, info in catalog.items():
            if not resource.plural or "/" in resource.plural:
                continue
            self.add(ResourceDef(
                group=resource.group or "", version=resource.version, plural=resource.plural, kind=info.kind or "",
                namespaced=bool(info.namespaced), singular=info.singular or "", shortnames=sorted(info.shortnames),
                categories=sorted(info.categories), subresources=set(info.subresources),
            ))
        # Built-ins whose status is a subresource in a real cluster (the catalog does not always say).
        for key in [("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets"), ("", "pods"), ("", "namespaces"),
                    ("policy", "poddisruptionbudgets"), ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "services")]:
            if key in self.by_key:
                self.by_key[key].subresources.add("status")
        for key in [("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets")]:
            if key in self.by_key:
                self.by_key[key].subresources.add("scale")

    def add(self, resource: ResourceDef) -> None:
        existing = self.by_key.get(resource.key)
        if existing is None or resource.group == "" or existing.version.startswith("v1beta") or resource.version == "v1":
            self.by_key[resource.key] = resource

    def find(self, group: str, version: str, plural: str) -> ResourceDef | None:
        resource = self.by_key.get((group, plural))
        if resource is None or (version != resource.version and version not in resource.versions):
            return None
        return resource

    def register_crd(self, crd: dict[str, Any]) -> ResourceDef:
        spec = crd["spec"]
        names = spec["names"]
        versions = [v for v in spec.get("versions", []) if v.get("served", True)]
        storage = next((v for v in versions if v.get("storage")), versions[0])
        subresources = storage.get("subresources") or {}
        scale = subresources.get("scale") or {}
        resource = ResourceDef(
            group=spec["group"], version=storage["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced", singular=names.get("singular", names["kind"].lower()),
            shortnames=list(names.get("shortNames", [])), categories=list(names.get("categories", [])),
            subresources={s for s in ("status", "scale") if s in subresources},
            scale_spec_path=scale.get("specReplicasPath", ".spec.replicas"),
            scale_status_path=scale.get("statusReplicasPath", ".status.replicas"),
            printer_columns=list(storage.get("additionalPrinterColumns", [])),
            schema=(storage.get("schema") or {}).get("openAPIV3Schema"),
            versions=[v["name"] for v in versions],
        )
        self.by_key[resource.key] = resource
        return resource

    def unregister_crd(self, crd: dict[str, Any]) -> None:
        self.by_key.pop((crd["spec"]["group"], crd["spec"]["names"]["plural"]), None)

    # -- discovery ------------------------------------------------------------------------------

    def groups(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for r in self.by_key.values():
            result.setdefault(r.group, [])
            for v in [r.version, *r.versions]:
                if v not in result[r.group]:
                    result[r.group].append(v)
        return result

    def api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        entries = []
        for r in sorted(self.by_key.values(), key=lambda r: r.plural):
            if r.group != group or version not in (r.version, *r.versions):
                continue
            entries.append({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortNames": r.shortnames, "categories": r.categories,
            })
            for sub in sorted(r.subresources):
                kind = "Scale" if sub == "scale" else r.kind
                entries.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced, "kind": kind,
                                "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version, "resources": entries}

    def api_group(self, group: str) -> dict[str, Any]:
        versions = self.groups().get(group, [])
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]} if versions else None}

    def api_group_list(self) -> dict[str, Any]:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self.api_group(g) for g in sorted(self.groups()) if g]}


# -- defaults ---------------------------------------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any] | None) -> Any:
    """Fill in ``default`` values of an OpenAPI v3 schema, as the API server does for custom objects."""
    if not schema:
        return value
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = _copy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and schema.get("items"):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


# -- tables -----------------------------------------------------------------------------------------


def json_path(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns: ``.spec.replicas``, ``.status.conditions[0].type``."""
    value = obj
    for part in [p for p in path.strip().lstrip("$").split(".") if p]:
        index = None
        if "[" in part and part.endswith("]"):
            part, index = part[: part.index("[")], part[part.index("[") + 1 : -1]
        value = value.get(part) if isinstance(value, dict) else None
        if index is not None:
            if index == "*" or not isinstance(value, list):
                value = value if index == "*" else None
            else:
                position = int(index)
                value = value[position] if -len(value) <= position < len(value) else None
        if value is None:
            return None
    return value


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= 120):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(resource: ResourceDef, objects: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    custom = [c for c in resource.printer_columns if c.get("name") != "Age"]
    columns += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                 "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in custom]
    columns.append({"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0})
    rows = []
    for obj in objects:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in custom:
            value = json_path(obj, column.get("jsonPath", ""))
            if column.get("type") == "date" and isinstance(value, str):
                value = age(value)
            cells.append("" if value is None else value)
        cells.append(age(obj["metadata"].get("creationTimestamp")))
        partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        rows.append({"cells": cells, "object": partial})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}


# -- OpenAPI v3 stub ----------------------------------------------------------------------------------


def openapi_v3_index(registry: Registry) -> dict[str, Any]:
    """One document per group-version, as a real server lists them."""
    paths = {}
    for group, versions in registry.groups().items():
        for version in versions:
            key = f"api/{version}" if not group else f"apis/{group}/{version}"
            paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}"}
    return {"paths": paths}


def openapi_v3_document(registry: Registry, group: str, version: str) -> dict[str, Any]:
    """Only what kubectl reads: each resource's PATCH accepts ``fieldValidation``, so kubectl leaves
    validation to the server instead of validating against schemas this stub does not carry."""
    paths = {}
    for r in registry.by_key.values():
        if r.group != group or version not in (r.version, *r.versions):
            continue
        prefix = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        scope = "/namespaces/{namespace}" if r.namespaced else ""
        paths[f"{prefix}{scope}/{r.plural}/{{name}}"] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        }}
    return {"openapi": "3.0.0", "info": {"title": "lorafleet embedded API", "version": version}, "paths": paths, "components": {"schemas": {}}}
