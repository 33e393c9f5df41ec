"""Every dashboard query evaluated by a real Prometheus scraping real replicas and a gateway under a scripted load.

Parsing PromQL proves a query names the right series; only Prometheus proves it returns something (a ``rate`` over
the wrong type, a wrong ``by``, a histogram without ``_bucket`` all parse). A `lorafleet up` fleet of the tiny model
(two replicas with eight device slots each, the gateway) is scraped every second, with the labels a ServiceMonitor
gives the targets (namespace, pod, app_kubernetes_io_instance). The load: twenty-four adapters through the gateway
(first uses are cold loads; 24 adapters on 16 slots thrash), base-model requests, streams, and one adapter whose
logits overflow (an error). Then each panel's queries run through Prometheus's HTTP API: each returns data, and the counters agree with
what the load did. Prometheus is Debian's package (`.ci/run` installs it); without it this test fails and says how.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from support.kube import pods
from support.server import free_port
from support.waiting import wait_until

from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.e2e  # starts processes and a Prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "charts" / "lorafleet" / "monitoring" / "dashboard.json").read_text())
LABELS = {"namespace": "default", "app_kubernetes_io_instance": "smollm2"}
INSTALL = "prometheus is not installed: `apt-get install prometheus` (Debian/Ubuntu, as root), or put Prometheus's release on PATH"
OPTIONAL = ("DCGM_",)  # NVIDIA's dcgm-exporter's series: a panel for clusters that run it, empty here


@contextlib.contextmanager
def prometheus(targets: dict[str, tuple[str, str]], tmp: Path):
    binary = shutil.which("prometheus")
    assert binary, INSTALL  # not skipped: a dashboard nobody evaluated is the defect this test exists to catch
    jobs: dict[str, list] = {}
    for pod, (job, url) in targets.items():  # what a ServiceMonitor's relabelling gives each target
        jobs.setdefault(job, []).append({"targets": [url.removeprefix("http://")], "labels": {**LABELS, "pod": pod}})
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": job, "static_configs": static} for job, static in jobs.items()]}
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, timeout=30, what="Prometheus ready")

        def scraping() -> bool:  # its discovery hands targets to the scrapers every 5 s
            active = httpx.get(url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)

        wait_until(scraping, timeout=30, what="every target scraped")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus_url: str, expr: str) -> list[dict]:
    response = httpx.get(prometheus_url + "/api/v1/query", params={"query": expr}, timeout=30)
    assert response.status_code == 200, f"{expr}: {response.text}"
    return response.json()["data"]["result"]


def as_prometheus_gets_it(expr: str) -> str:
    """Grafana's variables as it would send them: every namespace and fleet, a rate window of a few scrapes."""
    return expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$fleet", ".*")


def test_every_dashboard_query_returns_what_the_load_did(fleet, tmp_path) -> None:
    _, kubectl, gateway_url, _, adapters, model, _ = fleet
    names = [f"a{i}" for i in range(24)]
    for i, name in enumerate(names):
        make_lora_adapter(model, adapters / name, r=4, seed=i)
    make_lora_adapter(model, adapters / "overflow", r=4, seed=99, scale=1e30)  # loads, then no usable token: a 424
    targets = {name: ("replicas", f"http://{pod['status']['podIP']}:8080") for name, pod in pods(kubectl).items()}
    with prometheus({**targets, "gateway": ("gateway", gateway_url)}, tmp_path) as prom:
        sent: Counter = Counter()
        with httpx.Client(base_url=gateway_url, timeout=120) as client:
            def ask(adapter: str | None, stream: bool = False) -> int:
                parameters = {"adapter_id": adapter, "adapter_source": "local"} if adapter else {}
                body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3, **parameters}}
                response = client.post("/generate_stream" if stream else "/generate", json=body)
                sent[(adapter or "", response.status_code)] += 1
                return response.status_code

            # Every series is made first and scraped, so that the rates over the next requests see them grow (a series
            # born and finished between two scrapes has no rate: the tiny model answers this whole load in a second).
            for name in names:
                assert ask(name) == 200
            assert ask(None) == 200 and ask("a0", stream=True) == 200 and ask("overflow") == 424
            time.sleep(2.5)
            for _ in range(2):  # 24 adapters over 16 slots, in turn: every round reloads many of them (a thrash)
                for name in names:
                    assert ask(name) == 200
                    time.sleep(0.1)
            for _ in range(3):
                assert ask(None) == 200 and ask("a0", stream=True) == 200
            assert ask("overflow") == 424

        # The counters agree with the load, exactly (not a rate's extrapolation), once a scrape after it is in.
        def by_adapter() -> dict[str, float]:
            result = query(prom, 'sum by (adapter) (lorafleet_requests_total{route=~"/generate.*"})')
            return {r["metric"].get("adapter", ""): float(r["value"][1]) for r in result}

        expected = {"": 4.0, "a0": 3.0 + 4.0, **{n: 3.0 for n in names[1:]}, "overflow": 2.0}
        # lorafleet up's own Adapters (pirate, support-bot.v2) took no request: no series of theirs
        try:
            wait_until(lambda: by_adapter() == expected, timeout=15, what="the load in Prometheus")
        except AssertionError:
            raise AssertionError(by_adapter()) from None
        time.sleep(2)  # and a few more scrapes, so every rate window holds the load
        errors = query(prom, 'sum(lorafleet_requests_total{status="424"})')
        assert float(errors[0]["value"][1]) == 2.0
        routed = sum(float(r["value"][1]) for r in query(prom, "sum by (result) (lorafleet_gateway_routing_total)"))
        assert routed == sum(sent.values())
        cold_loads = float(query(prom, 'sum(lorafleet_adapter_load_seconds_count{step="cpu_to_device"})')[0]["value"][1])
        assert cold_loads > len(names) + 1  # every adapter's first use, and the thrash reloading them
        caches = {r["metric"]["cache"] for r in query(prom, "sum by (cache) (lorafleet_time_to_first_token_seconds_count)")}
        assert caches == {"hot", "cold"}

        shown, empty, unusable = {}, [], []
        for panel in DASHBOARD["panels"]:
            for target in panel.get("targets", []):
                result = query(prom, as_prometheus_gets_it(target["expr"]))
                if any(optional in target["expr"] for optional in OPTIONAL):
                    continue
                if not result:
                    empty.append(f"{panel['title']}: {target['expr']}")
                elif all(r["value"][1] == "NaN" for r in result):  # a quantile of buckets that did not move: nothing to plot
                    unusable.append(f"{panel['title']}: {target['expr']}")
                shown[f"{panel['title']} [{target['refId']}]"] = {json.dumps(r["metric"], sort_keys=True): r["value"][1] for r in result}
        assert not empty, "panels with no data:\n" + "\n".join(empty)
        assert not unusable, "panels with only NaN:\n" + "\n".join(unusable)
        requests = shown["Requests/s by adapter (top adapters; the rest are `other`, \"\" is the base model) [A]"]
        busiest = {json.loads(k).get("adapter", "") for k, v in requests.items() if float(v) > 0}
        assert len(busiest) == 10 and "a0" in busiest and busiest <= {"", *names, "overflow"}  # topk(10): a0 took the most
        errors_shown = float(shown["Error ratio (5xx and 424 of generate requests) [A]"]["{}"])
        assert 0 < errors_shown < 0.1  # one 424 among the ~55 requests the window holds
        ttft = shown["Time to first token, hot vs cold [B]"]
        assert {json.loads(k)["cache"] for k in ttft} == {"hot", "cold"}  # p95 of both, from the buckets
        memory = shown["Memory per replica by holder (base weights, KV cache, adapter slots, CPU and disk tiers) [A]"]
        assert {json.loads(k)["kind"] for k in memory} >= {"base_weights", "kv_cache_allocated", "adapter_slots_allocated", "cpu_tier", "disk_tier"}
        for title, series in shown.items():  # the values, for the record (pytest -s)
            print(f"{title}: " + "; ".join(f"{k} = {v}" for k, v in sorted(series.items())[:6]))
