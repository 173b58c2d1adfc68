"""deploy/observability's drift rules, their promtool tests and the drift dashboard: valid, every
alert fires and stays quiet in a test, every name is one docs/metrics.md lists and
``edgebento monitor`` exports, and no query is by device."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cloud_sync.drift import FeatureResult, WindowResult
from cloud_sync.drift_report import DriftMetrics
from tests.support.promtool import assert_promtool_passes, promtool
from tests.unit.test_observability_rules import METRIC, contract_metrics, signal_of

OBS = Path(__file__).resolve().parents[2] / "deploy" / "observability"
RULES = OBS / "rules" / "drift.rules.yml"
DASHBOARD = OBS / "grafana" / "drift.json"


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] if p["type"] != "row" for t in p["targets"]]


def _run(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=OBS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_pass_promtool_and_every_alert_fires_and_stays_quiet() -> None:
    _run("check", "rules", str(RULES))
    _run("check", "config", "prometheus.yml")  # which loads them
    assert "SUCCESS" in _run("test", "rules", "tests/drift.test.yml")
    doc = yaml.safe_load((OBS / "tests" / "drift.test.yml").read_text())
    cases = [c for t in doc["tests"] for c in t.get("alert_rule_test", [])]
    alerts = [r for r in _rules() if "alert" in r]
    assert {a["alert"] for a in alerts} == {"EdgebentoDriftDetected", "EdgebentoDriftOutOfRange"}
    recorded = {r["record"] for r in _rules() if "record" in r}
    for alert in alerts:
        name = alert["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), name
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), name
        assert signal_of(alert) in recorded, name


def test_rules_and_dashboard_name_exported_contract_metrics_never_by_device() -> None:
    metrics = DriftMetrics()
    feature = FeatureResult("x[0]", 500, 0.4, 0.1, 0.3, 1e-9, True, (), 0.0, 0.2, 0.5, (1.0,))
    window = WindowResult(60.0, 500, 5, "drift", (feature,), alarm=True)
    metrics.update({("cam", 3, "lobby"): [window]})
    text = metrics.render()
    assert_promtool_passes(text)
    exported = set(METRIC.findall(text))
    used = {n for e in [r["expr"] for r in _rules()] + _queries() for n in METRIC.findall(e)}
    assert used <= exported, used - exported
    assert used <= contract_metrics(), "list them in docs/metrics.md"
    assert exported - {n for n in exported if n.endswith("_created")} <= contract_metrics()
    by_device = ("device=", "by (device", "device)")
    assert not any(b in q for q in [*_queries(), text] for b in by_device)
