"""The embedded Kubernetes API: kmock's emulator with a store that behaves like a real API server.

KMock (by kopf's author) gives the emulator class, the catalog of built-in resources taken from
a real cluster, and the Status error shape. What kopf and kubectl need beyond plain kmock 0.8 —
resourceVersions and conflicts, JSON/merge patches, PUT, status and scale subresources,
finalizers, garbage collection, selectors, resumable watches, CRDs that register themselves,
server-side Tables, discovery, and an OpenAPI v3 stub that kubectl's client-side validation accepts — needs a different data model
from kmock's object history, so ``KubeAPI`` keeps kmock's class and serving contract (an aiohttp
handler) and answers every request from ``Store`` and ``Registry``. Its request log is not kept:
the API runs for as long as ``lorafleet up`` does, and a log that only grows would be a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp.web
import attrs
import kmock
import prometheus_client

from lorafleet.local.kubeapi import paths
from lorafleet.local.kubeapi.resources import Registry, ResourceDef, openapi_v3_document, openapi_v3_index, table
from lorafleet.local.kubeapi.selectors import field_selector, label_selector
from lorafleet.local.kubeapi.store import ApiError, Store, Watcher

log = logging.getLogger(__name__)
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
JSON = "application/json"
VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _json(body: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(body=json.dumps(body).encode(), status=status, content_type=JSON)


@attrs.define(kw_only=True)
class KubeAPI(kmock.KubernetesEmulator):
    registry: Registry = attrs.field(factory=Registry)
    store: Store = attrs.field(factory=Store)
    metrics: prometheus_client.CollectorRegistry = attrs.field(factory=lambda: prometheus_client.CollectorRegistry(auto_describe=True))
    requests: prometheus_client.Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.requests = prometheus_client.Counter("apiserver_request", "requests answered, as a real API server counts them",
                                                  ["verb", "resource", "subresource", "code"], registry=self.metrics)
        self.registry.load_bundled()
        self.store.on_change.append(self._follow_crds)
        namespaces = self.registry.by_key[("", "namespaces")]
        for name in ("default", "kube-system", "kube-public"):
            self.store.create(namespaces, None, {"metadata": {"name": name}, "status": {"phase": "Active"}})

    # -- the aiohttp entry point ----------------------------------------------------------------

    async def __call__(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if request.method == "GET" and request.path == "/metrics":
            return aiohttp.web.Response(body=prometheus_client.generate_latest(self.metrics), content_type="text/plain")
        try:
            response = await self._serve(request)
        except ApiError as exc:
            response = _json(exc.status_object(), exc.status)
        except Exception as exc:  # never a dropped connection: a 500 Status the clients understand
            log.exception("embedded API failed on %s %s", request.method, request.path)
            response = _json(ApiError(500, "InternalError", repr(exc)).status_object(), 500)
        self._count(request, response.status)
        return response

    def _count(self, request: aiohttp.web.BaseRequest, code: int) -> None:
        """``apiserver_request_total`` as a real API server labels it (verb, resource, subresource, code)."""
        parsed = paths.parse(request.path, lambda g, p: bool((r := self.registry.by_key.get((g, p))) and r.namespaced))
        resource, subresource = (parsed.plural or "", parsed.subresource or "") if parsed else ("", "")
        verb = VERBS.get(request.method, request.method.lower())
        if request.method == "GET":
            verb = "watch" if request.query.get("watch") in ("true", "1") else ("get" if parsed and parsed.name else "list")
        self.requests.labels(verb, resource, subresource, str(code)).inc()

    async def _serve(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path, method = request.path, request.method
        if method == "GET":
            if path == "/version":
                return _json({"major": "1", "minor": "32", "gitVersion": "v1.32.0-lorafleet", "platform": "linux/amd64"})
            if path == "/api":
                return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            if path == "/apis":
                return _json(self.registry.api_group_list())
            if path == "/openapi/v3":
                return _json(openapi_v3_index(self.registry))
            if path.startswith("/openapi/v3/"):
                rest = path[len("/openapi/v3/"):].split("/")
                group, version = ("", rest[1]) if rest[0] == "api" else (rest[1], rest[2])
                return _json(openapi_v3_document(self.registry, group, version))
            if path.startswith("/openapi/"):
                raise ApiError(404, "NotFound", "the embedded API publishes no OpenAPI schemas")
            parts = [p for p in path.split("/") if p]
            if len(parts) == 2 and parts[0] == "apis":
                if parts[1] not in self.registry.groups():
                    raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
                return _json(self.registry.api_group(parts[1]))
        parsed = paths.parse(path, lambda g, p: bool((r := self.registry.by_key.get((g, p))) and r.namespaced))
        if parsed is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if parsed.plural is None:
            if parsed.version not in self.registry.groups().get(parsed.group, []):
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            return _json(self.registry.api_resource_list(parsed.group, parsed.version))
        resource = self.registry.find(parsed.group, parsed.version, parsed.plural)
        if resource is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if parsed.subresource not in (None, "status", "scale") or (parsed.subresource and parsed.subresource not in resource.subresources):
            raise ApiError(404, "NotFound", f"{resource.plural} has no subresource {parsed.subresource!r}")
        namespace = parsed.namespace if resource.namespaced else None
        query = request.query
        as_table = "as=Table" in request.headers.get("Accept", "")
        body = await self._body(request) if method in ("POST", "PUT", "PATCH") else None

        if method == "GET" and parsed.name is None:
            matches = self._matcher(query)
            if query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace, matches, as_table)
            items = self.store.list(resource, namespace, matches)
            version = str(self.store.revision)
            if as_table:
                return _json(table(resource, items, version))
            return _json({"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": {"resourceVersion": version}, "items": items})
        if method == "POST" and parsed.name is None:
            if resource.namespaced and not self.store.namespace_exists(namespace or "default", self.registry.by_key[("", "namespaces")]):
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            return _json(self.store.create(resource, namespace, body), 201)
        if method == "DELETE" and parsed.name is None:
            items = self.store.list(resource, namespace, self._matcher(query))
            for item in items:
                self.store.delete(resource, item["metadata"].get("namespace"), item["metadata"]["name"])
            return _json({"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": {}, "items": items})
        if parsed.name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        if method == "GET":
            obj = self.store.get(resource, namespace, parsed.name)
            if parsed.subresource == "scale":
                return _json(self.store.scale(resource, obj))
            return _json(table(resource, [obj], obj["metadata"]["resourceVersion"]) if as_table else obj)
        if method == "PUT":
            if parsed.subresource == "scale":
                return _json(self.store.set_scale(resource, self.store.get(resource, namespace, parsed.name), body))
            return _json(self.store.replace(resource, namespace, parsed.name, body, parsed.subresource))
        if method == "PATCH":
            patch_type = request.headers.get("Content-Type", JSON).split(";")[0]
            return _json(self.store.patch(resource, namespace, parsed.name, body, patch_type, parsed.subresource))
        if method == "DELETE":
            return _json(self.store.delete(resource, namespace, parsed.name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    @staticmethod
    async def _body(request: aiohttp.web.BaseRequest) -> Any:
        try:
            raw = await request.read()
        except aiohttp.web.HTTPRequestEntityTooLarge as exc:  # a real API server answers 413 too (its limit is 3 MB)
            raise ApiError(413, "RequestEntityTooLarge", f"the request body is larger than {request.client_max_size} bytes") from exc
        if "protobuf" in request.headers.get("Content-Type", ""):
            raise ApiError(415, "UnsupportedMediaType", "protobuf bodies are not supported by the embedded API; use JSON (kubectl apply -f)")
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body is not valid JSON: {exc}") from exc

    @staticmethod
    def _matcher(query: Any) -> Any:
        labels, fields = label_selector(query.get("labelSelector")), field_selector(query.get("fieldSelector"))
        return lambda obj: labels(obj) and fields(obj)

    async def _watch(self, request: aiohttp.web.BaseRequest, resource: ResourceDef, namespace: str | None, matches: Any, as_table: bool) -> aiohttp.web.StreamResponse:
        since = request.query.get("resourceVersion")
        watcher = Watcher(resource, namespace, matches)
        if since and since != "0":
            initial = self.store.events_since(resource, namespace, int(since), matches)
        else:
            initial = [{"type": "ADDED", "object": obj} for obj in self.store.list(resource, namespace, matches)]
        self.store.watchers.append(watcher)  # registered before any await: no event falls in between
        response = aiohttp.web.StreamResponse(headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"})
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        try:
            await response.prepare(request)
            for event in initial:
                await response.write(self._event_line(event, resource, as_table))
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(timeout):
                    while True:
                        event = await watcher.queue.get()
                        await response.write(self._event_line(event, resource, as_table))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.watchers.remove(watcher)
        return response

    @staticmethod
    def _event_line(event: dict, resource: ResourceDef, as_table: bool) -> bytes:
        if as_table:
            event = {"type": event["type"], "object": table(resource, [event["object"]], event["object"]["metadata"]["resourceVersion"])}
        return json.dumps(event).encode() + b"\n"

    # -- CRDs -----------------------------------------------------------------------------------

    def _follow_crds(self, kind: str, resource: ResourceDef, obj: dict[str, Any]) -> None:
        if resource.key == ("", "namespaces") and kind == "DELETED":
            name = obj["metadata"]["name"]
            for other in list(self.registry.by_key.values()):
                if other.namespaced:
                    for item in self.store.list(other, name, lambda o: True):
                        self.store.delete(other, name, item["metadata"]["name"])
            return
        if resource.key != CRD_KEY:
            return
        if kind == "DELETED":
            custom = self.registry.by_key.get((obj["spec"]["group"], obj["spec"]["names"]["plural"]))
            if custom is not None:
                for item in self.store.list(custom, None, lambda o: True):
                    self.store.delete(custom, item["metadata"].get("namespace"), item["metadata"]["name"])
            self.registry.unregister_crd(obj)
            return
        try:
            self.registry.register_crd(obj)
        except (KeyError, IndexError, TypeError) as exc:
            log.warning("CustomResourceDefinition %s is incomplete (%s); not registered", obj["metadata"]["name"], exc)
            return
        if not (obj.get("status") or {}).get("conditions"):
            established = {"conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": obj["metadata"]["creationTimestamp"]},
                                          {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": obj["metadata"]["creationTimestamp"]}],
                           "acceptedNames": obj["spec"]["names"]}
            loop = asyncio.get_event_loop()
            loop.call_soon(lambda: self.store.patch(resource, None, obj["metadata"]["name"], {"status": established}, "merge-patch", "status"))
