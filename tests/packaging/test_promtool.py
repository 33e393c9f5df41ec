"""The alerts checked and unit-tested by Prometheus's own promtool: every alert fires on series that must fire it and
stays quiet on series that must not (tests/monitoring/alerts_test.yaml), and the PrometheusRule the chart renders
passes `promtool check rules`. promtool comes from Debian's `prometheus` package (`.ci/run` installs it as root)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from support.helm import render

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "promtool is not installed: `apt-get install prometheus` (Debian/Ubuntu, as root), or put Prometheus's release on PATH"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, INSTALL  # not skipped: an alert nobody evaluated is the defect this test exists to catch
    return found


def test_every_alert_fires_when_it_must_and_only_then() -> None:
    run = subprocess.run([promtool(), "test", "rules", "alerts_test.yaml"], cwd=ROOT / "tests" / "monitoring", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    tested = {t["alertname"] for case in yaml.safe_load((ROOT / "tests" / "monitoring" / "alerts_test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    shipped = {r["alert"] for g in yaml.safe_load((ROOT / "charts" / "lorafleet" / "monitoring" / "alerts.yaml").read_text())["groups"] for r in g["rules"]}
    assert tested == shipped  # a new alert comes with its cases


def test_the_rendered_prometheus_rule_passes_promtool_check(tmp_path: Path) -> None:
    rule = next(o for o in render({"metrics": {"prometheusRule": {"enabled": True}}}) if o["kind"] == "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    run = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "SUCCESS: 7 rules found" in run.stdout, run.stdout + run.stderr
