"""The gateway follows a Service's ready EndpointSlices through the kubernetes client, within a second."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kube_standin import KubeStandIn
from server_helpers import free_port


def wait_for(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_ready_set_changes_reach_the_gateway_within_a_second(tmp_path: Path) -> None:
    with KubeStandIn(free_port()) as kube:
        kube.set_slice("fleet-abc", [("fleet-0", "127.0.0.2", True), ("fleet-1", "127.0.0.3", False)], 8080)
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        port = free_port()
        gateway = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "gateway", "--port", str(port), "--service", "default/fleet"],
                                   env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/replicas"

            def members() -> dict[str, str]:
                try:
                    return {r["name"]: r["url"] for r in httpx.get(url, timeout=1).json()["replicas"]}
                except (httpx.HTTPError, ValueError):
                    return {}

            wait_for(lambda: members() == {"fleet-0": "http://127.0.0.2:8080"}, timeout=20)
            kube.set_slice("fleet-abc", [("fleet-0", "127.0.0.2", True), ("fleet-1", "127.0.0.3", True)], 8080)
            assert wait_for(lambda: set(members()) == {"fleet-0", "fleet-1"}) < 1.0
            kube.set_slice("fleet-abc", [("fleet-0", "127.0.0.9", True), ("fleet-1", "127.0.0.3", False)], 8080)  # a new IP, one unready
            assert wait_for(lambda: members() == {"fleet-0": "http://127.0.0.9:8080"}) < 1.0
        finally:
            gateway.terminate()
            gateway.wait(10)
