"""The real Prometheus (Debian's package) against a running BentoML service, edge agent and sync
process, with the rules and dashboard of deploy/observability: every panel's PromQL and every
alert's signal returns series on that data, every rule evaluates, and no dashboard query names a
metric no target exports. The same run is demo-sized, so every log line of every process it
started is parsed as JSON."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgebento.localservices import LOOPBACK, Mosquitto, Prometheus, free_port
from tests.support.agent import Client, make_pack
from tests.unit.test_observability_rules import METRIC, alerts, dashboard_queries, signal_of

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEVICE = "obs-1"
SCHEMA = {"time", "level", "logger", "message"}


@dataclass
class Stack:
    prometheus: Prometheus
    logs: list[Path]
    service: str
    started: float  # when Prometheus began to scrape: queries cover the run since


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=log.with_suffix(".out").open("wb"),
        stderr=log.open("wb"),
        start_new_session=True,
    )


def _run(
    argv: list[str], env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(check: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("observability")
    env = {
        **os.environ,
        "EDGEBENTO_LOG_FORMAT": "json",  # what every process would choose off a terminal
        "BENTOML_HOME": str(work / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "EDGEBENTO_MODEL": "tiny:v1",
        "EDGEBENTO_WORKERS": "1",
        "EDGEBENTO_MAX_QUEUE": "2",  # a short flood is enough to be refused with 503s
        "EDGEBENTO_CACHE_BYTES": "1048576",
    }
    soon = datetime.now(UTC) + timedelta(days=3)  # the expiry alert has something to see
    v1 = make_pack(work / "v1", mlp_model, keys[0], version=1, expires_at=soon)
    v2 = make_pack(work / "v2", mlp_model, keys[0], version=2, expires_at=soon)
    v3 = make_pack(work / "v3", mlp_model, keys[0], version=3, wrong_golden=True)
    store, logs = work / "store", work / "logs"
    logs.mkdir()
    for pack in (v1, v2, v3):
        _run([str(BIN / "edgebento"), "publish", str(pack), "--store", str(store),
              "--key", str(keys[0]), "--force"], env)  # fmt: skip
    _run([str(BIN / "edgebento"), "bento", "import", str(v1), "--pub", str(keys[1])], env)
    broker = Mosquitto(workdir=work / "mosquitto").start()
    ports = {
        "service": free_port(),
        "sync": free_port(),
        "agent": free_port(),
        "rollout": free_port(),
    }
    procs = [
        _start([str(BIN / "bentoml"), "serve", ".", "--host", LOOPBACK,
                "--port", str(ports["service"])], logs / "bentoml.log", env),
        _start([str(BIN / "edgebento"), "sync", "--broker", broker.url, "--store", str(store),
                "--metrics-port", str(ports["sync"]), "--client-id", "obs-sync"],
               logs / "sync.log", env),
        _start([str(BIN / "edge-agent"), "run", "--device", DEVICE, "--broker", broker.url,
                "--data-dir", str(work / "device"), "--trust", str(keys[1]), "--store", str(store),
                "--pack", str(v1), "--telemetry-interval", "1",
                "--metrics-port", str(ports["agent"])], logs / "agent.log", env),
    ]  # fmt: skip
    prometheus = Prometheus(
        work / "prometheus",
        {
            "edgebento-service": [(f"{LOOPBACK}:{ports['service']}", {})],
            "edgebento-sync": [(f"{LOOPBACK}:{ports['sync']}", {})],
            "edgebento-agent": [(f"{LOOPBACK}:{ports['agent']}", {"device": DEVICE})],
            "edgebento-rollout": [(f"{LOOPBACK}:{ports['rollout']}", {})],  # while one runs
        },
    )
    client = None
    try:
        service = f"http://{LOOPBACK}:{ports['service']}"
        _wait(lambda: httpx.get(service + "/readyz", timeout=2).status_code == 200, "service")
        prometheus.start()
        prometheus.wait_scraped(("edgebento-service", "edgebento-sync", "edgebento-agent"), 120)
        started = time.time()
        _traffic(service, broker)
        for version, ok in ((2, True), (3, False)):  # v3's golden samples fail: it aborts
            done = _run(
                [str(BIN / "edgebento"), "rollout", "tiny", str(version), "--store", str(store),
                 "--broker", broker.url, "--devices", DEVICE, "--canary", "100", "--waves", "1",
                 "--bake", "2", "--wave-timeout", "30", "--key", str(keys[0]),
                 "--metrics-port", str(ports["rollout"]), "--metrics-linger", "120",
                 "--wait", "--timeout", "90",
                 "--allow-unverified"],  # no traffic during the rollout: nothing to judge by
                env, check=False,
            )  # fmt: skip
            (logs / f"rollout-{version}.log").write_text(done.stderr)
            assert (done.returncode == 0) is ok, done.stdout + done.stderr
        client = Client(broker)
        for i in range(20):  # more inference telemetry, after the rollouts
            client.request(
                f"edgebento/{DEVICE}/infer", {"id": f"late-{i}", "inputs": {"x": [[0.5] * 8]}}
            )
        _wait(lambda: prometheus.query("edgebento_fleet_inference_p99_seconds"), "fleet p99", 60)

        def everything_seen() -> bool:
            """Scrapes and evaluations took in all of the above (each every second, if the
            machine gives them time)."""
            firing = prometheus.alerts().get("EdgebentoPackExpiringSoon") == "firing"
            exprs = [_promql(e) for _, e in dashboard_queries()] + [signal_of(a) for a in alerts()]
            return (
                firing
                and "EdgebentoIngestionRejects" in prometheus.fired(started)
                and all(prometheus.query_range(e, started, time.time()) for e in exprs)
            )

        deadline = time.monotonic() + 120
        while not everything_seen() and time.monotonic() < deadline:
            time.sleep(0.5)  # past the deadline, the tests below say what is missing
        yield Stack(prometheus, sorted(logs.glob("*.log")), service, started)
    finally:
        if client is not None:
            client.close()
        prometheus.stop()
        for proc in reversed(procs):
            _stop(proc)
        broker.stop()


def _traffic(service: str, broker: Mosquitto) -> None:
    """OK and refused requests on HTTP, inferences over MQTT: every outcome has a series."""
    with httpx.Client(timeout=30) as http:
        for _ in range(30):
            assert (
                http.post(service + "/predict", json={"inputs": {"x": [[0.1] * 8]}}).status_code
                == 200
            )
        assert http.post(service + "/predict", content=b"{").status_code == 400
    _flood(service)
    client = Client(broker)
    try:
        # A message that breaks the protocol: the ingestion stores it under rejected/ and counts it.
        client.publish(f"edgebento/{DEVICE}/telemetry", b"not json")
        for i in range(30):
            client.request(
                f"edgebento/{DEVICE}/infer", {"id": f"i-{i}", "inputs": {"x": [[0.2] * 8]}}
            )
    finally:
        client.close()


def _flood(service: str, clients: int = 24, seconds: float = 2.0) -> None:
    """Concurrent clients with other inputs each time, until some are refused as overload (on a
    busy machine the clients may at first be slower than the model)."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start, refused = time.monotonic(), threading.Event()

    def flooding() -> bool:
        spent = time.monotonic() - start
        return spent < seconds or (not refused.is_set() and spent < 120)

    def client(seed: int) -> set[int]:
        rng, seen = random.Random(seed), set()
        with httpx.Client(timeout=30) as http:
            while flooding():
                rows = [[rng.random() for _ in range(8)]]
                status = http.post(service + "/predict", json={"inputs": {"x": rows}}).status_code
                seen.add(status)
                if status == 503:
                    refused.set()
        return seen

    with ThreadPoolExecutor(clients) as pool:
        statuses = set().union(*pool.map(client, range(clients)))
    assert statuses == {200, 503}, statuses


def _promql(expr: str) -> str:
    """A dashboard query as Grafana would send it: its variables filled in."""
    return expr.replace("$__rate_interval", "30s").replace("$job", ".*")


def _series(stack: Stack, expr: str) -> list[Any]:
    """The series ``expr`` has over the run, as a dashboard's range query shows them."""
    return stack.prometheus.query_range(expr, stack.started, time.time(), step=1.0)


def test_every_dashboard_query_returns_series(stack: Stack) -> None:
    empty = [
        f"{title}: {expr}"
        for title, expr in dashboard_queries()
        if not _series(stack, _promql(expr))
    ]
    assert empty == []


def test_every_alert_signal_returns_series_and_every_rule_evaluates(stack: Stack) -> None:
    empty = [a["alert"] for a in alerts() if not _series(stack, signal_of(a))]
    assert empty == []
    for alert in alerts():  # the whole expression, threshold included, is valid PromQL
        stack.prometheus.query(alert["expr"])
    assert stack.prometheus.unhealthy_rules() == {}
    states = stack.prometheus.alerts()
    assert set(states) == {a["alert"] for a in alerts()}
    assert states["EdgebentoPackExpiringSoon"] == "firing"  # the packs expire in 3 days
    assert "EdgebentoIngestionRejects" in stack.prometheus.fired(stack.started)  # "not json"


def test_no_dashboard_query_names_a_metric_no_target_exports(stack: Stack) -> None:
    exported = {
        s["metric"]["__name__"]
        for s in _series(stack, 'group by (__name__) ({__name__=~"(edgebento|bentoml)_.+"})')
    }
    named = {name for _, expr in dashboard_queries() for name in METRIC.findall(expr)}
    assert named - exported == set()


def test_every_line_every_process_wrote_is_a_json_record(stack: Stack) -> None:
    seen: dict[str, int] = {}
    for log in stack.logs:
        outputs = [log, log.with_suffix(".out")] if log.with_suffix(".out").exists() else [log]
        for path in outputs:
            if path.suffix == ".out" and "bentoml" not in path.name:
                continue  # a command's stdout is its result, not a log; bentoml logs there
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    pytest.fail(f"{path.name}:{number} is not JSON: {line[:300]}")
                assert isinstance(record, dict), f"{path.name}:{number}"
                assert set(record) >= SCHEMA, f"{path.name}:{number}: {line}"
                assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", record["time"])
                if path.name == "agent.log":
                    assert record["device"] == DEVICE, line
                seen[path.name] = seen.get(path.name, 0) + 1
    assert {"agent.log", "sync.log", "bentoml.out", "rollout-3.log"} <= set(seen), seen
