"""What `lorafleet status` shows per tenant: requests, errors and tokens, from the gateway's own counters.

The gateway names tenants from its policy (never from a caller), so these are the declared tenants and no others.
One scrape: these are totals since the gateway started, ordered busiest first.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.replica_metrics import samples


@dataclass
class TenantUsage:
    name: str
    requests: int = 0
    errors: int = 0  # answered with a status outside 2xx: refused by a limit (429), not allowed (404), failed (5xx)
    prompt_tokens: int = 0
    generated_tokens: int = 0


def tenant_usage(text: str) -> list[TenantUsage]:
    usage: dict[str, TenantUsage] = {}
    for (name, labels), value in samples(text).items():
        labels_ = dict(labels)
        if "tenant" not in labels_:
            continue
        entry = usage.setdefault(labels_["tenant"], TenantUsage(labels_["tenant"]))
        if name == "lorafleet_gateway_tenant_requests_total":
            entry.requests += int(value)
            entry.errors += 0 if labels_.get("outcome", "").startswith("2") else int(value)
        elif name == "lorafleet_gateway_tenant_tokens_total":
            if labels_.get("kind") == "prompt":
                entry.prompt_tokens += int(value)
            else:
                entry.generated_tokens += int(value)
    return sorted(usage.values(), key=lambda u: (-u.requests, u.name))
