"""Reading a replica's /metrics: what `lorafleet status` and the operator's autoscaler both take from it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# lorafleet_adapter_events that mean an adapter request had to load its adapter (a cold request)
COLD_LOAD_EVENTS = ("cpu_hit", "disk_hit", "local_read", "source_fetch")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample by (name, sorted label pairs); ValueError for what is not a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}
