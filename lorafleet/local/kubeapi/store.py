"""The object store behind the embedded API: the semantics of a real API server, without HTTP.

One global resourceVersion counter changed by every write; uid, creationTimestamp, generation and
generateName on create; 409 on a stale resourceVersion or a name taken; JSON and merge patches;
generation bumped only when something outside metadata and status changes; the status
subresource kept apart from the main resource; no event for a write that changes nothing;
finalizers and deletionTimestamp; garbage collection of objects whose owner is gone; and a
history of events so that a watch can resume from a resourceVersion.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import random
import re
import string
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from lorafleet.local.kubeapi.resources import ResourceDef, apply_defaults
from lorafleet.local.kubeapi.schema_check import schema_error
from lorafleet.timestamps import now_text

HISTORY = 20_000
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_KINDS = {"Namespace", "Service"}  # their names become DNS labels; every other name is a subdomain


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.details = status, reason, message, details or {}

    def status_object(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.status}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def fold_string_data(obj: dict[str, Any]) -> None:
    """A Secret's ``stringData`` is write-only, as the API server has it: folded into ``data`` (base64), never stored."""
    if obj.get("kind") == "Secret" and isinstance(obj.get("stringData"), dict):
        data = obj.get("data") or {}
        obj["data"] = {**data, **{k: base64.b64encode(str(v).encode()).decode() for k, v in obj.pop("stringData").items()}}


def invalid_name(resource: ResourceDef, name: Any) -> None:
    """422 for a name a real API server refuses (RFC 1123), with its message."""
    label = resource.kind in DNS_LABEL_KINDS
    pattern, limit = (LABEL, 63) if label else (SUBDOMAIN, 253)
    if isinstance(name, str) and len(name) <= limit and pattern.fullmatch(name):
        return
    what, chars = ("RFC 1123 label", "or '-'") if label else ("RFC 1123 subdomain", "'-' or '.'")
    problem = (f'Invalid value: "{name}": a lowercase {what} must consist of lower case alphanumeric characters, {chars}, '
               f"start and end with an alphanumeric character, and be at most {limit} characters")
    raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: metadata.name: {problem}',
                   {"name": name, "group": resource.group, "kind": resource.kind,
                    "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": "metadata.name"}]})


@dataclass
class Watcher:
    resource: ResourceDef
    namespace: str | None
    matches: Callable[[dict], bool]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Store:
    def __init__(self) -> None:
        self.revision = 1
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = {}
        self.history: deque[tuple[int, tuple[str, str], str, dict[str, Any]]] = deque(maxlen=HISTORY)
        self.watchers: list[Watcher] = []
        # Per kind, the newest event history no longer holds. A watch is expired (410) only if it would miss an event
        # of its own kind: ten thousand Adapter writes must not expire an idle watch of CRDs or Namespaces (kopf
        # treats those as fatal), as etcd's time-based compaction would not within minutes.
        self.evicted: dict[tuple[str, str], int] = {}
        self.on_change: list[Callable[[str, ResourceDef, dict[str, Any]], None]] = []
        self.resolve_uid: dict[str, tuple[ResourceDef, str | None, str]] = {}

    # -- helpers --------------------------------------------------------------------------------

    def _bucket(self, resource: ResourceDef) -> dict[tuple[str | None, str], dict[str, Any]]:
        return self.objects.setdefault(resource.key, {})

    def _emit(self, resource: ResourceDef, kind: str, obj: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(obj)
        if len(self.history) == self.history.maxlen:  # the oldest event leaves: a watch of its kind from before it must relist
            version, key, _, _ = self.history[0]
            self.evicted[key] = version
        self.history.append((int(obj["metadata"]["resourceVersion"]), resource.key, kind, snapshot))
        for watcher in list(self.watchers):
            if watcher.resource.key == resource.key and watcher.namespace in (None, obj["metadata"].get("namespace")) and watcher.matches(snapshot):
                watcher.queue.put_nowait({"type": kind, "object": snapshot})
        for callback in self.on_change:
            callback(kind, resource, snapshot)

    def _next_version(self) -> str:
        self.revision += 1
        return str(self.revision)

    def get(self, resource: ResourceDef, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._bucket(resource).get((namespace if resource.namespaced else None, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource.plural}{"." + resource.group if resource.group else ""} "{name}" not found',
                           {"name": name, "group": resource.group, "kind": resource.plural})
        return obj

    def list(self, resource: ResourceDef, namespace: str | None, matches: Callable[[dict], bool]) -> list[dict[str, Any]]:
        items = [o for (ns, _), o in self._bucket(resource).items() if (namespace is None or ns == namespace) and matches(o)]
        return sorted(items, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    def namespace_exists(self, name: str, namespaces: ResourceDef) -> bool:
        return (None, name) in self._bucket(namespaces)

    # -- writes ---------------------------------------------------------------------------------

    def create(self, resource: ResourceDef, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", f"{resource.kind}: metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        invalid_name(resource, meta["name"])
        key = (meta.get("namespace"), meta["name"])
        if key in self._bucket(resource):
            raise ApiError(409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": resource.group, "kind": resource.plural})
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        fold_string_data(obj)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_text(), resourceVersion=self._next_version(), generation=1)
        meta.pop("deletionTimestamp", None)
        if resource.schema:
            apply_defaults(obj, resource.schema)
            if (problem := schema_error(resource.kind, resource.schema, obj)) is not None:
                raise ApiError(422, "Invalid", problem)
        self._bucket(resource)[key] = obj
        self.resolve_uid[meta["uid"]] = (resource, meta.get("namespace"), meta["name"])
        self._emit(resource, "ADDED", obj)
        return obj

    def replace(self, resource: ResourceDef, namespace: str | None, name: str, body: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        current = self.get(resource, namespace, name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        stated = (body.get("metadata") or {}).get("resourceVersion")
        if stated and stated != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified; '
                                            "please apply your changes to the latest version and try again")
        return self._write(resource, current, copy.deepcopy(body), subresource)

    def patch(self, resource: ResourceDef, namespace: str | None, name: str, patch: Any, patch_type: str, subresource: str | None = None) -> dict[str, Any]:
        if "apply-patch" in patch_type:  # before the lookup: a new object would otherwise get a misleading 404
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not supported by the embedded API; "
                                                        "use client-side apply (kubectl apply without --server-side)")
        current = self.get(resource, namespace, name)
        base = copy.deepcopy(current)
        if subresource == "scale":
            base = self.scale(resource, current)
        try:
            if "json-patch" in patch_type:
                updated = jsonpatch.apply_patch(base, patch)
            elif "merge-patch" in patch_type or "strategic-merge-patch" in patch_type:
                updated = merge_patch(base, patch)  # strategic merge treated as a merge patch: lists are replaced
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the patch type {patch_type!r} is not supported")
        except jsonpatch.JsonPatchTestFailed as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") from exc
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {exc}") from exc
        stated = ((updated.get("metadata") or {}) if isinstance(updated, dict) else {}).get("resourceVersion")
        if stated and subresource != "scale" and stated != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified')
        if subresource == "scale":
            return self.set_scale(resource, current, updated)
        return self._write(resource, current, updated, subresource)

    def _write(self, resource: ResourceDef, current: dict[str, Any], body: dict[str, Any], subresource: str | None) -> dict[str, Any]:
        """Store ``body`` as the new state of ``current`` (status kept apart when it is a subresource)."""
        new = copy.deepcopy(current)
        if subresource == "status":
            new["status"] = body.get("status")
            if new["status"] is None:
                new.pop("status")
        else:
            keep_status = "status" in resource.subresources
            meta = body.get("metadata") or {}
            for key in [k for k in new if k not in ("metadata", "apiVersion", "kind") and not (keep_status and k == "status")]:
                del new[key]
            for key, value in body.items():
                if key in ("metadata", "apiVersion", "kind") or (keep_status and key == "status"):
                    continue
                new[key] = value
            for field_name in ("labels", "annotations", "finalizers", "ownerReferences"):
                if field_name in meta:
                    new["metadata"][field_name] = meta[field_name]
                else:
                    new["metadata"].pop(field_name, None)
            if resource.schema:
                apply_defaults(new, resource.schema)
            fold_string_data(new)
        if resource.schema and (problem := schema_error(resource.kind, resource.schema, new)) is not None:
            raise ApiError(422, "Invalid", problem)
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {k: v for k, v in current.items() if k not in ("metadata", "status")}
        if new == current:
            return current  # a no-op write: no new version, no event
        if spec_changed:
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = self._next_version()
        meta = new["metadata"]
        key = (meta.get("namespace"), meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._bucket(resource)[key]
            self._emit(resource, "DELETED", new)
            self._collect_garbage(meta["uid"])
            return new
        self._bucket(resource)[key] = new
        self._emit(resource, "MODIFIED", new)
        return new

    def delete(self, resource: ResourceDef, namespace: str | None, name: str) -> dict[str, Any]:
        current = self.get(resource, namespace, name)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return current
            new = copy.deepcopy(current)
            new["metadata"]["deletionTimestamp"] = now_text()
            new["metadata"]["resourceVersion"] = self._next_version()
            self._bucket(resource)[(meta.get("namespace"), meta["name"])] = new
            self._emit(resource, "MODIFIED", new)
            return new
        del self._bucket(resource)[(meta.get("namespace"), meta["name"])]
        gone = copy.deepcopy(current)
        gone["metadata"]["resourceVersion"] = self._next_version()
        self._emit(resource, "DELETED", gone)
        self._collect_garbage(meta["uid"])
        return gone

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: every object owned by the deleted one goes too."""
        self.resolve_uid.pop(owner_uid, None)
        owned = [
            self.resolve_uid[obj["metadata"]["uid"]]
            for bucket in self.objects.values() for obj in bucket.values()
            if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])
            and obj["metadata"]["uid"] in self.resolve_uid
        ]
        for resource, namespace, name in owned:
            if (namespace, name) in self._bucket(resource):
                self.delete(resource, namespace, name)

    # -- scale ----------------------------------------------------------------------------------

    def scale(self, resource: ResourceDef, obj: dict[str, Any]) -> dict[str, Any]:
        from lorafleet.local.kubeapi.resources import json_path

        meta = obj["metadata"]
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta["uid"],
                         "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
            "spec": {"replicas": json_path(obj, resource.scale_spec_path) or 0},
            "status": {"replicas": json_path(obj, resource.scale_status_path) or 0},
        }

    def set_scale(self, resource: ResourceDef, current: dict[str, Any], scale: dict[str, Any]) -> dict[str, Any]:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, "Invalid", f"spec.replicas must be a non-negative integer, got {replicas!r}")
        body = copy.deepcopy(current)
        target = body
        parts = [p for p in resource.scale_spec_path.split(".") if p]
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = replicas
        updated = self._write(resource, current, body, None)
        return self.scale(resource, updated)

    # -- watches --------------------------------------------------------------------------------

    def events_since(self, resource: ResourceDef, namespace: str | None, since: int, matches: Callable[[dict], bool]) -> list[dict[str, Any]]:
        if since < self.evicted.get(resource.key, 0):
            raise ApiError(410, "Expired", f"too old resource version: {since} ({self.history[0][0]})")
        return [
            {"type": kind, "object": copy.deepcopy(obj)}
            for version, key, kind, obj in self.history
            if version > since and key == resource.key and namespace in (None, obj["metadata"].get("namespace")) and matches(obj)
        ]
