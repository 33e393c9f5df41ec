"""The embedded Kubernetes API as test fixtures: a server, its kubeconfig, kubectl, and a demo CRD."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

WIDGET_CRD = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.demo.lorafleet.io}
spec:
  group: demo.lorafleet.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources:
        status: {}
        scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
      additionalPrinterColumns:
        - {name: Color, type: string, jsonPath: .spec.color}
        - {name: Replicas, type: integer, jsonPath: .spec.replicas}
        - {name: Phase, type: string, jsonPath: .status.phase}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                color: {type: string, default: blue}
                replicas: {type: integer, default: 1}
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
""")


@dataclass
class Kubectl:
    env: dict[str, str]

    def __call__(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=self.env, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["kubectl", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)


def kubectl_for(kubeconfig: Path, cache: Path) -> Kubectl:
    return Kubectl({**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(cache)})


def pods(kubectl) -> dict[str, dict]:
    items = json.loads(kubectl("get", "pods", "-l", "app.kubernetes.io/component=replica", "-o", "json").stdout)["items"]
    return {p["metadata"]["name"]: p for p in items}


def adapter_status(kubectl, name: str) -> dict:
    return json.loads(kubectl("get", "adapter", name, "-o", "json").stdout).get("status") or {}
