"""A small REST helper over the ``kubernetes`` client: create-or-update owned objects, read and list.

The kubeconfig is read when the client is made, from ``$KUBECONFIG`` as it is then (the
``kubernetes`` package reads it once at import, which a test or a CLI flag may come after), or
the in-cluster service account.
"""

from __future__ import annotations

import json
import os
from typing import Any

PLURALS = {
    "Deployment": "deployments", "Service": "services", "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings", "Pod": "pods",
    "BaseModel": "basemodels", "Adapter": "adapters", "EndpointSlice": "endpointslices", "Secret": "secrets",
    "NetworkPolicy": "networkpolicies", "Tenant": "tenants",
}


def api_client(pool_size: int = 16) -> Any:
    """A client with room for ``pool_size`` concurrent requests (the operator writes from a thread pool)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    path = os.environ.get("KUBECONFIG")
    if path:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def login(**_: Any) -> Any:
    """kopf's login, from the same configuration as ``api_client``."""
    import kopf

    configuration = api_client().configuration
    token = (configuration.api_key or {}).get("authorization", "")
    return kopf.ConnectionInfo(
        server=configuration.host, scheme="Bearer" if token else None, token=token.removeprefix("Bearer ") or None,
        insecure=not configuration.verify_ssl, ca_path=configuration.ssl_ca_cert,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
    )


def path_of(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{scope}/{PLURALS[kind]}" + (f"/{name}" if name else "")


class Kube:
    def __init__(self, client: Any | None = None) -> None:
        self.client = client or api_client()

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None, content_type: str = "application/json") -> Any:
        """One request through the client's own auth and TLS settings; None for a 404, ApiException for other errors."""
        from kubernetes.client.rest import ApiException

        method, url, headers, body, _ = self.client.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"}, auth_settings=["BearerToken"])
        response = self.client.call_api(method, url, headers, body)
        response.read()
        if response.status == 404:
            return None
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, http_resp=response)
        return json.loads(response.data) if response.data else None

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        return self._call("GET", path_of(api_version, kind, namespace, name))

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str = "") -> list[dict]:
        result = self._call("GET", path_of(api_version, kind, namespace), query=[("labelSelector", label_selector)] if label_selector else [])
        return (result or {}).get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self._call("DELETE", path_of(api_version, kind, namespace, name))

    def merge(self, api_version: str, kind: str, namespace: str | None, name: str, patch: dict) -> None:
        self._call("PATCH", path_of(api_version, kind, namespace, name), patch, content_type="application/merge-patch+json")

    def merge_status(self, api_version: str, kind: str, namespace: str | None, name: str, status: dict) -> None:
        """Merge-patch an object's status subresource (no-op writes cost nothing: the server skips them)."""
        self._call("PATCH", path_of(api_version, kind, namespace, name) + "/status", {"status": status}, content_type="application/merge-patch+json")

    def apply(self, obj: dict) -> tuple[str, dict]:
        """Create the object, or replace what we own of it; ('created'|'updated'|'unchanged', object)."""
        from kubernetes.client.rest import ApiException

        meta = obj["metadata"]
        current = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if current is None:
            try:
                return "created", self._call("POST", path_of(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        merged = dict(current)
        for key, value in obj.items():
            if key != "metadata" and key != "status":
                merged[key] = value
        merged["metadata"] = {**current["metadata"], "labels": meta.get("labels", {}), "ownerReferences": meta.get("ownerReferences", [])}
        if merged == current:
            return "unchanged", current
        return "updated", self._call("PUT", path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), merged)
