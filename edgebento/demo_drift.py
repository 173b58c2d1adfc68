"""The demo's drift step: two cohorts of the cloud's registry of groups, lobby (dev-1) and dock
(dev-2 and a device enrolled for it, dev-4). The dock's cameras turn darker; ``edgebento monitor``,
serving its gauges to the demo's Prometheus, raises that cohort's alarm (with any one device left
out, so a cohort of two: one device alone never alarms, by design), the rule
``EdgebentoDriftDetected`` of deploy/observability fires for cohort dock, read back from
Prometheus, and lobby stays ok."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgebento.demo_fleet import (
    TELEMETRY_INTERVAL,
    Fleet,
    publish_all,
    running_versions,
    start_agent,
    wait_online,
)
from edgebento.demo_mtls import claim
from edgebento.demo_runner import BIN, Demo, console
from edgebento.demo_traffic import paced_requests
from edgebento.localservices import OBSERVABILITY, Prometheus

WINDOW_S = "5"  # EDGEBENTO_DRIFT_WINDOW_S of the demo's agents: windows short enough to watch
PRODUCTION_WINDOW_S = 60.0  # the agents' default window, which the rules' ``for`` is sized to
ROWS, RATE, MAX_SECONDS = 8, 25, 90.0  # traffic runs until the alarm, at most MAX_SECONDS
EXTRA = "dev-4"  # enrolled for this step, so that dock is a cohort of two
COHORTS = {"lobby": ("dev-1",), "dock": ("dev-2", EXTRA)}
DARKER = {"dev-1": 1.0, "dev-2": 0.4, EXTRA: 0.4}  # each device's camera against the baseline's
ALERT = "EdgebentoDriftDetected"
MODEL, VERSION = "digits", "2"
_FOR = re.compile(r"^(\s*for:\s*)(\d+)([smh])\s*$", re.MULTILINE)


def demo_rules(directory: Path, window_s: float = float(WINDOW_S)) -> Path:
    """deploy/observability's rules for the demo's Prometheus: edgebento.rules.yml as it is, and
    drift.rules.yml with each ``for`` scaled by the demo's window against the production one
    (5 s windows instead of 60 s: 5m becomes 25s), the expressions unchanged. The glob to load."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        OBSERVABILITY / "rules" / "edgebento.rules.yml", directory / "edgebento.rules.yml"
    )
    scale = window_s / PRODUCTION_WINDOW_S
    unit = {"s": 1, "m": 60, "h": 3600}

    def scaled(m: re.Match[str]) -> str:
        seconds = max(1, round(int(m[2]) * unit[m[3]] * scale))
        return f"{m[1]}{seconds}s"

    text = (OBSERVABILITY / "rules" / "drift.rules.yml").read_text()
    (directory / "drift.rules.yml").write_text(_FOR.sub(scaled, text))
    return directory / "*.rules.yml"


def drift_alerts(
    prometheus: Prometheus, model: str = MODEL, version: str = VERSION
) -> dict[str, str]:
    """Cohort -> state (pending or firing) of ``EdgebentoDriftDetected`` for ``model`` and
    ``version``, as Prometheus's /api/v1/alerts reports them."""
    return {
        a["labels"]["cohort"]: a["state"]
        for a in prometheus.api("alerts")["alerts"]
        if a["labels"].get("alertname") == ALERT
        and a["labels"].get("model") == model
        and a["labels"].get("version") == version
    }


def _alarm(prometheus: Prometheus, cohort: str) -> bool:
    """The monitor's confirmed alarm for ``cohort``, as Prometheus last scraped it."""
    expr = (
        f'cohort:edgebento_drift_alarm:max{{model="{MODEL}",version="{VERSION}",cohort="{cohort}"}}'
    )
    return any(float(s["value"][1]) == 1 for s in prometheus.query(expr))


def _until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.5)


def step_drift(demo: Demo, fleet: Fleet, calib: Path, v2: Path, prometheus: Prometheus) -> str:
    store = fleet.store
    # dev-4 enrolls by claim and starts on v2, as a device provisioned with the current version
    # would: its summaries against v2's baseline like the others'. It enrolls while the
    # cohorts and the monitor are set up.
    token = claim(demo, store, (EXTRA,))[EXTRA]
    start_agent(
        demo, fleet, EXTRA, token, "--store", store, "--pack", v2,
        "--telemetry-interval", TELEMETRY_INTERVAL,
    )  # fmt: skip
    for cohort, devices in COHORTS.items():
        demo.run(BIN / "edgebento", "fleet", "group", "add", cohort, *devices, "--store", store)
    monitor: list[str | Path] = [
        BIN / "edgebento", "monitor", "--store", store, "--model", MODEL, "--version", VERSION,
        "--trust", fleet.keys / "signing.pub", "--min-samples", "100",
    ]  # fmt: skip
    demo.start(
        "monitor", *monitor, "--out", demo.workdir / "monitor",
        "--metrics-port", str(fleet.ports.monitor), "--every", "2",
    )  # fmt: skip
    wait_online(fleet, (EXTRA,), timeout=90)
    if (version := running_versions(fleet, (EXTRA,))[EXTRA]) != int(VERSION):
        raise RuntimeError(f"{EXTRA} runs v{version}, not v{VERSION}")
    console.print(
        f"[dim]dev-1 (lobby) sees images like the baseline's, the cameras of dev-2 and {EXTRA} "
        f"(dock) are 60 % darker: {RATE} requests/s of {ROWS} rows each until the monitor "
        "raises an alarm[/dim]"
    )
    stop = threading.Event()
    # Rows of the baseline's own data, times each device's ``DARKER``.
    lines = paced_requests(
        calib, tuple(DARKER), "drift", stop, rows=ROWS, rate=RATE, seconds=MAX_SECONDS, seed=2,
        transform=lambda device, x: x * DARKER[device],
    )  # fmt: skip
    sender = threading.Thread(target=publish_all, args=(fleet, lines), daemon=True)
    sender.start()  # one connection: the operator's certificate
    try:
        _until(lambda: _alarm(prometheus, "dock"), "the monitor's alarm for cohort dock", 120)
    finally:
        stop.set()
        sender.join(timeout=60)
    console.print(f"[dim]cohort dock's alarm is scraped; waiting for {ALERT} to fire[/dim]")
    _until(
        lambda: drift_alerts(prometheus).get("dock") == "firing", f"{ALERT} for cohort dock", 120
    )
    alerts = drift_alerts(prometheus)
    if "lobby" in alerts or _alarm(prometheus, "lobby"):
        raise RuntimeError(f"cohort lobby alarmed: {alerts}")
    out = demo.workdir / "drift"
    demo.run(*monitor, "--out", out)  # what a user types: the report of the same store
    by = {c["cohort"]: c for c in json.loads((out / "drift.json").read_text())["cohorts"]}
    dock, lobby = by.get("dock"), by.get("lobby")
    if dock is None or lobby is None:
        raise RuntimeError(f"no summaries for both cohorts: {sorted(by)}")
    if not dock["alarm"] or lobby["verdict"] != "ok":
        raise RuntimeError(
            f"dock {dock['verdict']} (alarm {dock['alarm']}), lobby {lobby['verdict']}"
        )
    latest = next(w for w in dock["windows"] if w["start"] == dock["latest_judged_start"])
    moved = max(latest["features"], key=lambda f: f["psi"])
    shown = ", ".join(f"cohort {c} {s}" for c, s in sorted(alerts.items()))
    console.print(f"Prometheus {prometheus.url}/api/v1/alerts: {ALERT} {shown}")
    return (
        f"cohort dock (dev-2, {EXTRA}): drift ALARM ({moved['name']} PSI {moved['psi']:.2f}, "
        f"{latest['devices']} devices); cohort lobby (dev-1): ok; Prometheus: {ALERT} {shown}, "
        f"none for lobby; report {out / 'drift.html'}"
    )
