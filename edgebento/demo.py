"""``edgebento demo``: the whole story on embedded defaults, step by step, with the commands a user
types, ending with one table.

A Keras model is trained on scikit-learn's digits and optimized into a signed pack; the Lambda
handler answers an event; BentoML serves it (tensor JSON, OIP from tritonclient, a flood answered
with 200s and 503s); two edge agents on a real Mosquitto get v2 by a rollout, refuse a broken v3
(the canary's health check rolls it back and the rollout aborts), and keep every telemetry record
through a broker killed with -9; the inputs of one cohort's two devices drift, and
``edgebento monitor`` and the drift alert name that cohort; a subtly broken v4 rolled out with
``--shadow`` aborts on its agreement. The broker runs
with mTLS and the ACL ``fleet broker-config`` generates, the devices enroll by claim and renew
their certificates while all that runs; a third device enrolls, one device cannot speak for
another, and the third is revoked; Prometheus scrapes it all and the
table shows the alert states.
Everything started is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.table import Table

from edgebento import demo_cloud as cloud
from edgebento import demo_drift, demo_identity, demo_shadow
from edgebento import demo_fleet as fleet_steps
from edgebento.demo_runner import BIN, Demo, Stopped, console, section, stop_on_sigterm
from edgebento.localservices import LOOPBACK, Prometheus


def start_prometheus(demo: Demo, service_url: str, ports: fleet_steps.MetricsPorts) -> Prometheus:
    """Scraping the service now, and the sync process, agents and rollouts once they run."""
    targets: dict[str, list[tuple[str, dict[str, str]]]] = {
        "edgebento-service": [(service_url.removeprefix("http://"), {})],
        "edgebento-sync": [(f"{LOOPBACK}:{ports.sync}", {})],
        "edgebento-agent": [
            (f"{LOOPBACK}:{port}", {"device": device}) for device, port in ports.agents.items()
        ],
        "edgebento-rollout": [(f"{LOOPBACK}:{ports.rollout}", {})],
        "edgebento-monitor": [(f"{LOOPBACK}:{ports.monitor}", {})],  # up from the drift step
    }
    rules = demo_drift.demo_rules(demo.workdir / "prometheus" / "rules")
    prometheus = Prometheus(demo.workdir / "prometheus", targets, rules=rules)
    console.print(
        f"[dim]$[/dim] [bold]prometheus --config.file={prometheus.workdir / 'prometheus.yml'} "
        f"--web.listen-address={LOOPBACK}:{prometheus.port} &[/bold] "
        "[dim](rules: deploy/observability/rules/edgebento.rules.yml and drift.rules.yml, its "
        f"'for' scaled to the demo's {demo_drift.WINDOW_S}-second drift windows)[/dim]"
    )
    demo.stoppers.append(prometheus.start().stop)
    prometheus.wait_scraped(jobs=("edgebento-service",))
    return prometheus


# What the story does and the alerts that must say so: the broken v3's rollout aborts, the dock
# cohort's inputs drift.
EXPECTED_ALERTS = ("EdgebentoRolloutAborted", demo_drift.ALERT)


def alert_states(prometheus: Prometheus, since: float, timeout: float = 30.0) -> dict[str, str]:
    """The state of every alert after the whole story, and which of them fired during it.
    Rules are evaluated every second, but an alert's signal can come later than the step behind
    it (``edgebento sync`` reads how rollouts ended every 10 s): the alerts the story must have
    raised are waited for, up to ``timeout``, rather than read once after a fixed pause."""
    deadline = time.monotonic() + timeout
    while True:
        unhealthy = prometheus.unhealthy_rules()
        if unhealthy:
            raise RuntimeError(f"rules that fail to evaluate: {unhealthy}")
        fired = prometheus.fired(since)
        states = {
            name: state if state != "inactive" or name not in fired else "fired, now inactive"
            for name, state in prometheus.alerts().items()
        }
        if time.monotonic() > deadline or all(
            states.get(n, "inactive") != "inactive" for n in EXPECTED_ALERTS
        ):
            return states
        time.sleep(1)


def _story(demo: Demo, keys: Path) -> dict[str, str]:
    with section("1. keys"):
        demo.run(BIN / "edgebento", "keygen", "--out", keys)
    with section("2. a trained model"):
        paths = cloud.step_model(demo)
    with section("3. optimize into signed ModelPacks (v1, v2, and a broken v3)"):
        packs = cloud.step_optimize(demo, paths, keys)
    request = cloud.digit_request(paths)
    with section("4. serverless: the Lambda handler"):
        demo.attempt("lambda", lambda: cloud.step_lambda(demo, packs.v1, keys, request))
    with section("5. cloud: BentoML, Prometheus, an OIP client, a flood"):
        url = cloud.start_bentoml(demo, packs.v1, keys)
        ports = fleet_steps.MetricsPorts()
        prometheus = start_prometheus(demo, url, ports)
        since = time.time()
        demo.note("prometheus", f"{prometheus.url} scrapes the service (and the fleet, once up)")
        demo.attempt("bentoml", lambda: cloud.step_predict(url, request))
        demo.attempt("OIP (tritonclient)", lambda: cloud.step_oip(url, request))
        demo.attempt("flood", lambda: cloud.step_flood(url, request))
    with section("6. edge: a fleet CA, a broker with mTLS, a registry, sync, two agents by claim"):
        os.environ.setdefault("EDGEBENTO_DRIFT_WINDOW_S", demo_drift.WINDOW_S)
        fleet = fleet_steps.start_fleet(demo, packs, keys, ports)
        prometheus.wait_scraped(jobs=("edgebento-service", "edgebento-sync", "edgebento-agent"))
        demo.attempt(
            "edge inference", lambda: fleet_steps.step_mqtt_inference(demo, fleet, request)
        )
    with section("7. rollout of v2"):
        demo.attempt("rollout v2", lambda: fleet_steps.step_rollout_v2(demo, fleet))
    with section("8. the broker killed with -9 during traffic"):
        demo.attempt("broker kill -9", lambda: fleet_steps.step_broker_kill(demo, fleet, request))
    with section("9. a broken v3: the canary's health check rolls it back"):
        demo.attempt("rollout v3 (broken)", lambda: fleet_steps.step_broken_rollout(demo, fleet))
    with section("10. the fleet, and every telemetry record"):
        demo.attempt("fleet status", lambda: fleet_steps.step_fleet_status(demo, fleet))
        demo.attempt("telemetry", lambda: fleet_steps.step_exactly_once(fleet))
    with section("11. drift: the dock cohort's cameras turn darker; monitor and alert name it"):
        demo.attempt(
            "drift",
            lambda: demo_drift.step_drift(demo, fleet, paths["calib"], packs.v2, prometheus),
        )
    with section("12. a shadow rollout: a subtly broken v4 runs beside v2 and aborts"):
        demo.attempt(
            "shadow rollout",
            lambda: demo_shadow.step_shadow(demo, fleet, packs.v2, paths["eval"]),
        )
    with section("13. identity: a third device enrolls, one cannot speak for another, revocation"):
        demo.attempt("identity", lambda: demo_identity.step_identity(demo, fleet))
    with section("14. Prometheus: the alert states"):
        states: dict[str, str] = {}

        def alerts() -> str:
            states.update(alert_states(prometheus, since))
            silent = [n for n in EXPECTED_ALERTS if states.get(n, "inactive") == "inactive"]
            if silent:
                raise RuntimeError(f"{', '.join(silent)} did not fire during the story")
            firing = [n for n, s in states.items() if s != "inactive"]
            return f"{len(states)} rules evaluated; " + (
                ", ".join(f"{n} {states[n]}" for n in firing) if firing else "none firing"
            )

        demo.attempt("alerts", alerts)
    return states


def run_demo(workdir: Path) -> int:
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    demo = Demo(workdir)
    started = time.monotonic()
    states: dict[str, str] = {}
    interrupted = False
    try:
        with stop_on_sigterm():
            states = _story(demo, workdir / "keys")
    except (KeyboardInterrupt, Stopped):
        interrupted = True
        console.print("[bold red]interrupted: stopping everything the demo started[/bold red]")
    except Exception as exc:
        demo.note("demo", f"FAILED: {exc}", ok=False)
    finally:
        demo.stop_all()
    _print_table(demo, states, time.monotonic() - started)
    console.print(f"Everything is in {workdir}; JSON logs of every process in {workdir / 'logs'}")
    if interrupted:
        return 130
    return 1 if demo.failed else 0


def _print_table(demo: Demo, states: dict[str, str], seconds: float) -> None:
    table = Table(title=f"edgebento demo: one pack, three targets ({seconds:.0f}s)")
    table.add_column("step", style="bold")
    table.add_column("", justify="center")
    table.add_column("outcome")
    for outcome in demo.results:
        table.add_row(outcome.step, "✓" if outcome.ok else "[red]✗[/red]", outcome.text)
    for name, state in sorted(states.items()):
        style = {"inactive": "dim", "pending": "yellow"}.get(state, "red")
        table.add_row(f"alert {name}", "", f"[{style}]{state}[/{style}]")
    console.print(table)
