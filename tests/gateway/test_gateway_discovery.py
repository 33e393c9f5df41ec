"""The gateway follows a Service's ready EndpointSlices in the embedded Kubernetes API, within a second."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from kubernetes import client, config
from support.server import free_port
from support.waiting import wait_until


def endpoint_slice(endpoints: list[tuple[str, str, bool]]) -> dict:
    """endpoints: (pod name, address, ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "fleet-abc", "labels": {"kubernetes.io/service-name": "fleet"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}}
                      for pod, address, ready in endpoints],
    }


def test_ready_set_changes_reach_the_gateway_within_a_second(kube_api) -> None:
    discovery = client.DiscoveryV1Api(config.new_client_from_config(str(kube_api.kubeconfig)))
    discovery.create_namespaced_endpoint_slice("default", endpoint_slice([("fleet-0", "127.0.0.2", True), ("fleet-1", "127.0.0.3", False)]))
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "gateway", "--port", str(port), "--service", "default/fleet"],
                               env={**os.environ, "KUBECONFIG": str(kube_api.kubeconfig)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/replicas"

        def members() -> dict[str, str] | None:
            """None while the gateway does not answer: "no members left" must come from a gateway that does."""
            try:
                response = httpx.get(url, timeout=1)
                return {r["name"]: r["url"] for r in response.json()["replicas"]} if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None

        wait_until(lambda: members() == {"fleet-0": "http://127.0.0.2:8080"}, timeout=20)
        discovery.replace_namespaced_endpoint_slice("fleet-abc", "default", endpoint_slice([("fleet-0", "127.0.0.2", True), ("fleet-1", "127.0.0.3", True)]))
        assert wait_until(lambda: set(members()) == {"fleet-0", "fleet-1"}, timeout=5) < 1.0
        # a new IP for one pod, the other no longer ready
        discovery.replace_namespaced_endpoint_slice("fleet-abc", "default", endpoint_slice([("fleet-0", "127.0.0.9", True), ("fleet-1", "127.0.0.3", False)]))
        assert wait_until(lambda: members() == {"fleet-0": "http://127.0.0.9:8080"}, timeout=5) < 1.0
        discovery.delete_namespaced_endpoint_slice("fleet-abc", "default")
        assert wait_until(lambda: members() == {}, timeout=5) < 1.0
        assert gateway.poll() is None  # still running, and answering: members() was {} not None
    finally:
        gateway.terminate()
        gateway.wait(10)
