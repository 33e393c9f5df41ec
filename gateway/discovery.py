"""Where the replicas are: a static list of URLs, or a Kubernetes Service's ready EndpointSlices.

Member identity is the pod name from each endpoint's ``targetRef`` (the address when there is
none), so a pod that restarts with a new IP keeps its place on the ring. The watch runs in a
thread with the ``kubernetes`` client and hands each new member set to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def static_members(urls: list[str]) -> dict[str, str]:
    """``{name: url}`` for a static list; the name is host:port, which is what identifies it."""
    members = {}
    for url in urls:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if not parsed.hostname:
            raise ValueError(f"--replica {url!r} is not a URL")
        members[f"{parsed.hostname}:{parsed.port or 80}"] = f"{parsed.scheme}://{parsed.netloc}".rstrip("/")
    return members


def members_from_slices(slices: list[dict[str, Any]], port_name: str | None = None) -> dict[str, str]:
    """Ready endpoints of a Service's EndpointSlices as ``{pod name: url}`` (a pure function, tested alone)."""
    members: dict[str, str] = {}
    for item in slices:
        ports = item.get("ports") or []
        port = next((p.get("port") for p in ports if port_name is None or p.get("name") == port_name), None)
        if port is None:
            continue
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating"):
                continue
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            ref = endpoint.get("targetRef") or {}
            name = ref.get("name") or addresses[0]
            host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
            members[name] = f"http://{host}:{port}"
    return members


def load_kube_config() -> None:
    """The in-cluster service account, else ``$KUBECONFIG`` as it is now (the package reads it once, at import)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def watch_service(namespace: str, service: str, loop: asyncio.AbstractEventLoop, apply: Callable[[dict[str, str]], None],
                  stop: threading.Event) -> threading.Thread:
    """Watch the Service's EndpointSlices from a thread; every change applies the new member set within a second."""

    def run() -> None:
        from kubernetes import client, watch

        load_kube_config()
        api = client.DiscoveryV1Api()
        selector = f"kubernetes.io/service-name={service}"
        slices: dict[str, dict] = {}
        while not stop.is_set():
            try:
                listing = api.list_namespaced_endpoint_slice(namespace, label_selector=selector)
                slices = {s.metadata.name: api.api_client.sanitize_for_serialization(s) for s in listing.items}
                loop.call_soon_threadsafe(apply, members_from_slices(list(slices.values())))
                stream = watch.Watch().stream(api.list_namespaced_endpoint_slice, namespace, label_selector=selector,
                                              resource_version=listing.metadata.resource_version, timeout_seconds=30)
                for event in stream:
                    if stop.is_set():
                        return
                    obj = api.api_client.sanitize_for_serialization(event["object"])
                    if event["type"] == "DELETED":
                        slices.pop(obj["metadata"]["name"], None)
                    else:
                        slices[obj["metadata"]["name"]] = obj
                    loop.call_soon_threadsafe(apply, members_from_slices(list(slices.values())))
            except Exception as exc:  # the API server restarts, RBAC is missing, ...: keep the last members, retry
                log.warning("EndpointSlice watch for %s/%s failed (%s); retrying", namespace, service, exc)
                stop.wait(1.0)

    thread = threading.Thread(target=run, name="lorafleet-discovery", daemon=True)
    thread.start()
    return thread
