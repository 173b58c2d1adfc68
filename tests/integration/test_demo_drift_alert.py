"""The demo's drift alert: ``edgebento monitor --metrics-port`` serving a store in which a cohort
of two devices (dock) drifts and another (lobby) does not, scraped by a real Prometheus loading
the rules the demo gives it (deploy/observability's, drift's ``for`` scaled to the demo's short
windows): ``EdgebentoDriftDetected`` fires for dock, read back by cohort as the demo prints it,
and never for lobby. Before, the demo's Prometheus had no drift rules and no monitor to scrape,
and its dock cohort was one device, which never alarms."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cloud_sync.groups import change_group
from cloud_sync.store import open_store
from edgebento.demo_drift import ALERT, demo_rules, drift_alerts
from edgebento.localservices import LOOPBACK, OBSERVABILITY, Prometheus, free_port
from tests.support.drift_monitor import serve_monitor
from tests.support.drift_sim import SimFleet, drift_pack, mean_shift
from tests.support.promtool import promtool
from tests.unit.cloud_sync.test_drift_monitor_cli import records, write

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rules(path: Path) -> list[dict[str, object]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_the_demo_rules_are_the_repositorys_with_drifts_for_scaled(tmp_path: Path) -> None:
    glob = demo_rules(tmp_path / "rules")  # the demo's 5-second windows against 60 s
    assert glob == tmp_path / "rules" / "*.rules.yml"
    for name in ("edgebento.rules.yml", "drift.rules.yml"):
        check = subprocess.run(
            [promtool(), "check", "rules", str(tmp_path / "rules" / name)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "rules" / "edgebento.rules.yml").read_bytes() == (
        OBSERVABILITY / "rules" / "edgebento.rules.yml"
    ).read_bytes()
    original = _rules(OBSERVABILITY / "rules" / "drift.rules.yml")
    scaled = _rules(tmp_path / "rules" / "drift.rules.yml")
    assert [{k: v for k, v in r.items() if k != "for"} for r in scaled] == [
        {k: v for k, v in r.items() if k != "for"} for r in original
    ]
    fors = {r["alert"]: r.get("for") for r in scaled if "alert" in r}
    assert fors == {ALERT: "25s", "EdgebentoDriftOutOfRange": "50s"}


def test_the_drift_alert_fires_for_the_drifting_cohort_of_two_only(tmp_path: Path) -> None:
    pack = drift_pack(tmp_path / "sim")
    cohorts = {"dock": ["k0", "k1"], "lobby": ["l0"]}
    fleet = SimFleet(pack, cohorts, rows_per_device=200)
    fleet.window()
    for _ in range(3):  # both dock devices' inputs move by one standard deviation
        fleet.window({"dock": mean_shift(0, 1.0)})
    store = tmp_path / "store"
    write(store, records(fleet))
    for cohort, devices in cohorts.items():
        change_group(open_store(str(store)), cohort, add=devices)
    port = free_port()
    monitor = serve_monitor(store, pack.root, tmp_path / "o", port)
    # One-second windows: EdgebentoDriftDetected's 5m becomes 5s, a short wait for a test.
    rules = demo_rules(tmp_path / "rules", window_s=1.0)
    prometheus = Prometheus(
        tmp_path / "prometheus", {"edgebento-monitor": [(f"{LOOPBACK}:{port}", {})]}, rules=rules
    )
    try:
        prometheus.start()
        prometheus.wait_scraped()
        deadline = time.monotonic() + 90
        while (alerts := drift_alerts(prometheus, "drifty", "1")).get("dock") != "firing":
            assert time.monotonic() < deadline, alerts
            time.sleep(0.5)
        assert not prometheus.unhealthy_rules()
        assert "lobby" not in alerts, alerts
        firing = prometheus.query(f'ALERTS{{alertname="{ALERT}",alertstate="firing"}}')
        by_cohort = {s["metric"]["cohort"] for s in firing}
        assert "dock" in by_cohort and "lobby" not in by_cohort, by_cohort
        lobby = prometheus.query('cohort:edgebento_drift_alarm:max{cohort="lobby"}')
        assert [s["value"][1] for s in lobby] == ["0"]
    finally:
        prometheus.stop()
        monitor.send_signal(signal.SIGTERM)
        out, err = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, err
    assert "drifty v1 cohort dock: drift ALARM" in out
    assert "drifty v1 cohort lobby: ok" in out
