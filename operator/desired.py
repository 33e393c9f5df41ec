"""BaseModel spec → the objects that make its fleet. Pure functions: a test diffs their output.

For a BaseModel ``m``: a Deployment ``m-replicas`` of ``lorafleet serve``, a Service ``m-replicas``
in front of it (its EndpointSlices are how the gateway finds the replicas), a gateway Deployment
and Service ``m`` (the fleet's entry point), a PodDisruptionBudget, and the ServiceAccount, Role
and RoleBinding that let the gateway read EndpointSlices, a Secret ``m-admin`` with the replicas'
admin token (the gateway never gets it) and their warm token (the gateways' one credential: it allows
``POST /adapters/warm`` and nothing else), and a NetworkPolicy that admits to replica pods only the fleet's
gateways, the operator and the metrics scraper. The operator adds owner references, so
deleting the BaseModel removes all of it.
"""

from __future__ import annotations

import base64
from typing import Any

from lorafleet import __version__
from lorafleet.operator.rollout import parse_duration
from lorafleet.ring import DEFAULT_LOAD_FACTOR
from lorafleet.settings import flag_for_property

IMAGE = f"ghcr.io/lorafleet/lorafleet:{__version__}"  # the CRD's default and manifests/operator.yaml must match (tested)
REPLICA_PORT = 8080
GATEWAY_PORT = 8000
GATEWAY_METRICS_PORT = 9090  # the gateway's /metrics: in its Service for the scraper, never the port an Ingress exposes
DRAIN_SECONDS = 30
TENANTS_MOUNT = "/etc/lorafleet-tenants"
POLICY_KEY = "policy.json"
ADMIN_TOKEN_KEY = "token"
WARM_TOKEN_KEY = "warm-token"
OPERATOR_POD = {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/component": "operator"}  # manifests/ and the chart label it so
# Who else reaches replica pods when spec.networkPolicy.allowFrom says nothing: the Prometheus operator's pods (scraping
# /metrics), in any namespace. An InferencePool's proxy is added there by whoever routes through one.
DEFAULT_ALLOW_FROM = [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/instance": name, "app.kubernetes.io/component": component}


def replica_name(name: str) -> str:
    return f"{name}-replicas"


def tenants_secret_name(name: str) -> str:
    """The gateways' tenant policy (operator/tenant_policy.py renders it)."""
    return f"{name}-tenants"


def admin_secret_name(name: str) -> str:
    return f"{name}-admin"


def admin_secret(name: str, namespace: str, token: str, warm_token: str) -> dict[str, Any]:
    """The replicas' admin token (load, pin, unload), read by the operator and mounted into replicas only; and their
    warm token, mounted into replicas and gateways (hand-offs).

    The tokens are made once by the operator (the handler keeps existing ones), so this stays a
    pure function of its inputs.
    """
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": admin_secret_name(name), "namespace": namespace, "labels": labels(name, "replica")},
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode(), WARM_TOKEN_KEY: base64.b64encode(warm_token.encode()).decode()},
    }


def warm_token_env(name: str) -> dict[str, Any]:
    return {"name": "LORAFLEET_WARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": admin_secret_name(name), "key": WARM_TOKEN_KEY}}}


def replica_network_policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Replica pods admit the fleet's gateways, the operator (any namespace) and the metrics scraper, on the replica port:
    a pod elsewhere in the cluster must not reach the admin or warm routes, nor bypass the gateway's keys.
    None when ``spec.networkPolicy.enabled`` is false (a cluster whose CNI enforces none, or a policy of its own)."""
    policy = spec.get("networkPolicy") or {}
    if not policy.get("enabled", True):
        return None
    peers = [{"podSelector": {"matchLabels": labels(name, "gateway")}},
             {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_POD)}},
             *policy.get("allowFrom", DEFAULT_ALLOW_FROM)]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": replica_name(name), "namespace": namespace, "labels": labels(name, "replica")},
        "spec": {"podSelector": {"matchLabels": labels(name, "replica")}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": peers, "ports": [{"port": REPLICA_PORT, "protocol": "TCP"}]}]},
    }


def gateway_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{GATEWAY_PORT}"


def serve_args(spec: dict[str, Any], name: str | None = None) -> list[str]:
    """``lorafleet serve``'s arguments; ``name`` (the BaseModel's) is what clients call the base model."""
    model, engine = spec["model"], spec.get("engine") or {}
    args = ["serve", "--model", model["id"], *(["--served-model-name", name] if name else []), "--model-source", model.get("source", "hub"), "--dtype", model.get("dtype", "auto"),
            "--device", engine.get("device", "cuda"), "--host", "0.0.0.0", "--port", str(REPLICA_PORT),
            "--adapter-cache-dir", "/data/adapters", "--grace-period-s", str(DRAIN_SECONDS)]
    if model.get("revision"):
        args += ["--revision", model["revision"]]
    args += tracing_args(spec)
    # Every other spec.engine property is a `lorafleet serve` setting by the naming rule of lorafleet/settings.py (the CRD's
    # properties are generated from those settings), so a new setting needs no line here.
    for field, value in engine.items():
        if field == "device" or value is None:
            continue
        flag = flag_for_property(field)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            args += [flag, str(value)]
    return args


def with_tracing_default(spec: dict[str, Any], otlp_endpoint: str | None) -> dict[str, Any]:
    """The operator's --otlp-endpoint for a BaseModel that names none of its own (its own always wins)."""
    tracing = spec.get("tracing") or {}
    if not otlp_endpoint or tracing.get("otlpEndpoint"):
        return spec
    return {**spec, "tracing": {**tracing, "otlpEndpoint": otlp_endpoint}}


def tracing_args(spec: dict[str, Any]) -> list[str]:
    endpoint = (spec.get("tracing") or {}).get("otlpEndpoint")
    return ["--otlp-endpoint", endpoint] if endpoint else []


def tracing_env(spec: dict[str, Any], name: str, component: str) -> list[dict[str, str]]:
    """Traces name the fleet and its part (``<basemodel>-replica``, ``<basemodel>-gateway``)."""
    return [{"name": "OTEL_SERVICE_NAME", "value": f"{name}-{component}"}] if tracing_args(spec) else []


def _probe(path: str, period: int, failures: int, initial: int = 0, port: str = "http") -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures, "initialDelaySeconds": initial}


def replica_deployment(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = [{"name": "LORAFLEET_HOME", "value": "/data"}, {"name": "HF_HOME", "value": "/data/hf"},
           {"name": "LORAFLEET_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": admin_secret_name(name), "key": ADMIN_TOKEN_KEY}}},
           warm_token_env(name)]
    env += tracing_env(spec, name, "replica")
    token = spec.get("hfTokenSecretRef")
    if token:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token["name"], "key": token.get("key", "token")}}})
    cache = spec.get("cache") or {}
    volume = ({"name": "data", "persistentVolumeClaim": {"claimName": cache["claimName"]}} if cache.get("claimName")
              else {"name": "data", "emptyDir": {"sizeLimit": cache["sizeLimit"]} if cache.get("sizeLimit") else {}})
    container = {
        "name": "lorafleet",
        "image": spec.get("image", IMAGE),
        "args": serve_args(spec, name),
        "ports": [{"name": "http", "containerPort": REPLICA_PORT}],
        "env": env,
        "resources": spec.get("resources") or {},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        # Model loading can take many minutes: the startup probe allows 30; liveness starts after it.
        "startupProbe": _probe("/health", 10, 180),
        "readinessProbe": _probe("/health", 5, 2),
        "livenessProbe": _probe("/health", 15, 4),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [volume],
        "terminationGracePeriodSeconds": DRAIN_SECONDS + 15,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
    }
    for field in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    component = labels(name, "replica")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": replica_name(name), "namespace": namespace, "labels": component},
        "spec": {
            "replicas": spec.get("replicas", 1),
            "selector": {"matchLabels": component},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            # Every field that changes a replica is in the template, so a spec change rolls out; scaling does not.
            "template": {"metadata": {"labels": component}, "spec": pod_spec},
        },
    }


def replica_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": replica_name(name), "namespace": namespace, "labels": labels(name, "replica")},
        "spec": {"selector": labels(name, "replica"), "ports": [{"name": "http", "port": REPLICA_PORT, "targetPort": "http"}],
                 "publishNotReadyAddresses": False},
    }


def gateway_deployment(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    routing = spec.get("routing") or {}
    args = ["gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT), "--service", f"{namespace}/{replica_name(name)}", "--served-model-name", name,
            "--load-factor", str(routing.get("loadFactor", DEFAULT_LOAD_FACTOR)), *tracing_args(spec)]
    gateways = routing.get("gatewayReplicas", 2)
    # The tenant policy the operator renders (operator/tenant_policy.py): not optional, so a gateway never starts without it.
    volumes = [{"name": "tenants", "secret": {"secretName": tenants_secret_name(name), "items": [{"key": POLICY_KEY, "path": POLICY_KEY}]}}]
    mounts = [{"name": "tenants", "mountPath": TENANTS_MOUNT, "readOnly": True}]
    args += ["--tenants-file", f"{TENANTS_MOUNT}/{POLICY_KEY}", "--tenant-gateways", str(max(1, gateways)), "--metrics-port", str(GATEWAY_METRICS_PORT)]
    autoscaling = spec.get("autoscaling") or {}
    if autoscaling.get("enabled"):  # scale from zero: requests wait at the gateway, which says there is demand
        args += ["--hold-at-zero-s", str(parse_duration(autoscaling.get("coldStartTimeout"), 120.0)), "--demand-basemodel", f"{namespace}/{name}"]
    keys = routing.get("apiKeySecretRef")
    if keys:
        volumes.append({"name": "api-keys", "secret": {"secretName": keys["name"], "items": [{"key": keys.get("key", "keys"), "path": "keys"}]}})
        mounts.append({"name": "api-keys", "mountPath": "/etc/lorafleet", "readOnly": True})
        args += ["--api-key-file", "/etc/lorafleet/keys"]
    component = labels(name, "gateway")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": component},
        "spec": {
            # Two by default: one gateway is a single point of failure. Each bounds loads on its own
            # counts; the ring keeps them agreeing on owners (bench/routing_sim.py --gateways).
            "replicas": gateways,
            "selector": {"matchLabels": component},
            "template": {"metadata": {"labels": component}, "spec": {
                "serviceAccountName": f"{name}-gateway",
                "containers": [{
                    "name": "gateway", "image": spec.get("image", IMAGE), "args": args,
                    "ports": [{"name": "http", "containerPort": GATEWAY_PORT}, {"name": "metrics", "containerPort": GATEWAY_METRICS_PORT}],
                    "readinessProbe": _probe("/health", 5, 2), "livenessProbe": _probe("/metrics", 15, 4, port="metrics"),
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                    "volumeMounts": mounts,
                    "env": [warm_token_env(name), *tracing_env(spec, name, "gateway")],
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
                }],
                "volumes": volumes,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            }},
        },
    }


def gateway_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "gateway")},
        "spec": {"selector": labels(name, "gateway"), "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"},
                                                                {"name": "metrics", "port": GATEWAY_METRICS_PORT, "targetPort": "metrics"}]},
    }


def disruption_budget(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    # One replica may go at a time; a single-replica fleet may still be drained (else nodes could never drain).
    budget = {"maxUnavailable": 1}
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": replica_name(name), "namespace": namespace, "labels": labels(name, "replica")},
        "spec": {**budget, "selector": {"matchLabels": labels(name, "replica")}},
    }


def gateway_disruption_budget(name: str, namespace: str) -> dict[str, Any]:
    """A voluntary disruption (a node drain) takes at most one gateway at a time."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{name}-gateway", "namespace": namespace, "labels": labels(name, "gateway")},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(name, "gateway")}},
    }


def gateway_rbac(name: str, namespace: str) -> list[dict[str, Any]]:
    account = f"{name}-gateway"
    meta = {"name": account, "namespace": namespace, "labels": labels(name, "gateway")}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta),
         "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                   # Its own BaseModel only: the demand stamp that scales the fleet from zero (gateway/demand.py).
                   {"apiGroups": ["lorafleet.io"], "resources": ["basemodels"], "resourceNames": [name], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
    ]


def fleet_objects(name: str, namespace: str, spec: dict[str, Any], admin_token: str, warm_token: str) -> list[dict[str, Any]]:
    """Every object a BaseModel owns, in the order they are best created."""
    policy = replica_network_policy(name, namespace, spec)
    return [
        admin_secret(name, namespace, admin_token, warm_token),
        *([policy] if policy else []),
        *gateway_rbac(name, namespace),
        replica_service(name, namespace),
        replica_deployment(name, namespace, spec),
        disruption_budget(name, namespace, spec),
        gateway_service(name, namespace),
        gateway_deployment(name, namespace, spec),
        gateway_disruption_budget(name, namespace),
    ]
