"""`lorafleet status`'s table, from the objects in the API: every BaseModel, replica pod and Adapter, one line each."""

from __future__ import annotations

from lorafleet.local.up import print_status

OBJECTS = {
    "BaseModel": [{"metadata": {"name": "smollm2"}, "spec": {"replicas": 3},
                   "status": {"phase": "Ready", "readyReplicas": 2, "gateway": "http://127.0.0.1:8080"}}],
    "Pod": [{"metadata": {"name": "smollm2-replicas-abcde"}, "status": {"podIP": "127.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "smollm2-replicas-fghij"}, "status": {"podIP": "127.0.0.3", "conditions": [{"type": "Ready", "status": "False"}]}}],
    "Adapter": [{"metadata": {"name": "pirate"}, "status": {"phase": "Ready", "hotOn": "smollm2-replicas-abcde"}},
                {"metadata": {"name": "broken"}, "status": {"phase": "Failed"}},
                {"metadata": {"name": "new"}}],
    "Tenant": [{"metadata": {"name": "acme"}, "status": {"phase": "Ready", "keys": 2}}, {"metadata": {"name": "globex"}, "status": {"phase": "Ready", "keys": 1}},
               {"metadata": {"name": "idle"}, "status": {"phase": "Failed", "keys": 0}}],
}
GATEWAY_SCRAPE = """# TYPE lorafleet_gateway_tenant_requests_total counter
lorafleet_gateway_tenant_requests_total{outcome="200",tenant="acme"} 3.0
lorafleet_gateway_tenant_requests_total{outcome="200",tenant="globex"} 7.0
lorafleet_gateway_tenant_requests_total{outcome="429",tenant="globex"} 2.0
# TYPE lorafleet_gateway_tenant_tokens_total counter
lorafleet_gateway_tenant_tokens_total{kind="prompt",tenant="globex"} 90.0
lorafleet_gateway_tenant_tokens_total{kind="generated",tenant="globex"} 40.0
"""


class FakeKube:
    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def list(self, api_version: str, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        self.asked.append((api_version, kind, namespace, selector))
        return OBJECTS[kind]


def scrape(requests: float, device_hits: float, loads: float, resident: int, queue: int) -> str:
    """A replica's /metrics as it writes them (the lines replica_stats reads, among others)."""
    return f"""# TYPE lorafleet_requests_total counter
lorafleet_requests_total{{adapter="",route="/generate",status="200"}} {requests}
lorafleet_requests_total{{adapter="",route="other",status="200"}} 999.0
# TYPE lorafleet_adapter_events gauge
lorafleet_adapter_events{{event="device_hit"}} {device_hits}
lorafleet_adapter_events{{event="cpu_hit"}} {loads}
lorafleet_adapter_events{{event="device_evictions"}} 7.0
# TYPE lorafleet_adapter_tier_adapters gauge
lorafleet_adapter_tier_adapters{{tier="device"}} {resident}
# TYPE lorafleet_adapter_slots gauge
lorafleet_adapter_slots 8.0
# TYPE lorafleet_queue_size gauge
lorafleet_queue_size {queue}
"""


def test_status_prints_every_object_with_its_state(capsys) -> None:
    kube = FakeKube()
    scrapes = {"http://127.0.0.2:8080": iter([scrape(100, 30, 10, 5, 0), scrape(112, 36, 12, 6, 3)]), "http://127.0.0.3:8080": iter([None, None]),
               "http://127.0.0.1:8000": iter([GATEWAY_SCRAPE])}
    slept = []
    print_status(kube, interval=2.0, read=lambda url: next(scrapes[url]), sleep=slept.append, gateway="http://127.0.0.1:8000", top=2)
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert slept == [2.0]
    assert lines == [
        ["BASEMODEL", "PHASE", "READY", "GATEWAY"],
        ["smollm2", "Ready", "2/3", "http://127.0.0.1:8080"],
        ["REPLICA", "POD", "ADDRESS", "READY", "REQ/S", "HITS", "ADAPTERS", "QUEUE"],
        ["smollm2-replicas-abcde", "127.0.0.2", "yes", "6.0", "75%", "6/8", "3"],  # 12 generate requests in 2 s; 36 of 48 hot
        ["smollm2-replicas-fghij", "127.0.0.3", "no", "-"],  # its /metrics did not answer
        ["ADAPTER", "PHASE", "HOT", "ON"],
        ["pirate", "Ready", "smollm2-replicas-abcde"],
        ["broken", "Failed", "-"],
        ["new", "-", "-"],
        ["TENANT", "PHASE", "KEYS", "REQUESTS", "ERRORS", "PROMPT", "GENERATED"],  # the busiest first, at most `top`
        ["globex", "Ready", "1", "9", "2", "90", "40"],
        ["acme", "Ready", "2", "3", "0", "0", "0"],
    ]
    assert ("v1", "Pod", "default", "app.kubernetes.io/component=replica") in kube.asked  # replica pods only
