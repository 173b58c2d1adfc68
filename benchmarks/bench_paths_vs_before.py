"""No throughput lost on the serving and agent paths (issue 18): the tree before the hostile-input
review's fixes and this one, side by side in one run.

``EDGEBENTO_BENCH_RUNS`` rounds (3 by default); each starts, for each tree in turn (the order
alternating between rounds: A B, B A, ...), the same servers with ``PYTHONPATH`` set
to that tree (same venv, same machine, same minutes) and runs the same load:

- ``bentoml serve`` of the small MLP pack, wrk with 64 connections and with 1;
- the edge agent's local HTTP endpoint (``POST /infer``), wrk with 16 connections;
- the edge agent over MQTT, 3,000 requests with 64 in flight.

Each round gives this tree's throughput as a share of the earlier tree's, and the server's CPU per
request (all its processes) as a multiple of it; each figure is the median of the rounds with
their range. The target, on the medians: this tree keeps at least 95 % of the earlier tree's
capacity on every path (its server CPU per request at most 1/0.95 of the earlier's; throughput
ratios on 2 shared cores follow the load more than the trees), and no request fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import REPO, baseline_tree
from benchmarks.bench_agent import Requester, _wait_ready, pipelined
from benchmarks.figure import num
from benchmarks.runs import measured, rounds, summarize
from benchmarks.serving_common import (
    BIN,
    LOOPBACK,
    Process,
    free_port,
    import_to_store,
    wrk,
)
from tests.support.services import Mosquitto

# main before issue 18's fixes
BEFORE_COMMIT = "6b3ac19e050faa2ee19dc75e31fea4ce4528c80c"
SECONDS = 6.0
KEEP = 0.95


def _start(cmd: list[str], tree: Path, env: dict[str, str], port: int, log: Path) -> Process:
    popen = subprocess.Popen(
        cmd,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Process(popen, f"http://{LOOPBACK}:{port}", log)


def _bento(tree: Path, home: Path, tag: str, work: Path, label: str) -> dict[str, Any]:
    port = free_port()
    cmd = [str(BIN / "bentoml"), "serve", "bentos.service:EdgebentoService"]
    cmd += ["--host", LOOPBACK, "--port", str(port)]
    env = {"BENTOML_HOME": str(home), "EDGEBENTO_MODEL": tag, "BENTOML_DO_NOT_TRACK": "true"}
    proc = _start(cmd, tree, env, port, work / f"bento-{label}.log")
    try:
        proc.wait_ready("/readyz")
        bodies = _mlp_bodies(8)
        wrk(proc.url + "/predict", bodies, 64, 2)  # warm-up
        pid = proc.popen.pid
        many, many_cpu = measured(pid, lambda: wrk(proc.url + "/predict", bodies, 64, SECONDS))
        one, one_cpu = measured(
            pid, lambda: wrk(proc.url + "/predict", bodies, 1, SECONDS, threads=1)
        )
        return {
            "bento_rps_64": many.rps,
            "bento_cpu_us_64": _per_request(many_cpu, many.requests),
            "bento_p99_ms_64": many.p99_ms,
            "bento_non_2xx_64": many.non_2xx,
            "bento_rps_1": one.rps,
            "bento_cpu_us_1": _per_request(one_cpu, one.requests),
        }
    finally:
        proc.stop()


def _agent(
    tree: Path, broker: Mosquitto, pack: Path, pub: Path, work: Path, label: str
) -> dict[str, Any]:
    port = free_port()
    device = f"reg-{label}"
    cmd = [sys.executable, "-m", "edge_agent", "run", "--device", device]
    cmd += ["--broker", broker.url, "--data-dir", str(work / f"agent-{label}")]
    cmd += ["--trust", str(pub), "--pack", str(pack), "--prefix", "bench"]
    cmd += ["--metrics-port", str(port), "--log-level", "WARNING"]
    proc = _start(cmd, tree, {}, port, work / f"agent-{label}.log")
    req = Requester(broker.port, f"bench/{device}/infer")
    try:
        proc.wait_ready("/healthz", timeout=60)
        x = _digits_row()
        bodies = [json.dumps({"inputs": {"x": x}}).encode()]
        _wait_ready(req, x)
        pipelined(req, x, 500)  # warm-up
        pid = proc.popen.pid
        mqtt, mqtt_cpu = measured(pid, lambda: pipelined(req, x, 3000))
        http, http_cpu = measured(pid, lambda: wrk(proc.url + "/infer", bodies, 16, SECONDS))
        return {
            "agent_mqtt_per_s": mqtt["per_s"],
            "agent_mqtt_cpu_us": _per_request(mqtt_cpu, mqtt["requests"]),
            "agent_mqtt_failed": mqtt["failed"],
            "agent_http_rps_16": http.rps,
            "agent_http_cpu_us_16": _per_request(http_cpu, http.requests),
            "agent_http_non_2xx": http.non_2xx,
        }

    finally:
        req.close()
        proc.stop()


def _per_request(cpu_s: float, requests: int) -> float:
    """The server's CPU (all its processes) per answered request, in µs."""
    return 1e6 * cpu_s / max(requests, 1)


def _mlp_bodies(width: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, width)).round(4).tolist() for _ in range(64)]
    return [json.dumps({"inputs": {"x": r}}).encode() for r in rows]


def _digits_row() -> list[list[float]]:
    return np.random.default_rng(0).random((1, 64), dtype=np.float32).round(4).tolist()


def _packs(work: Path) -> tuple[Path, Path, Path]:
    from modelpack import Samples, create_pack, generate_keypair
    from tests.support import models

    key, pub = generate_keypair(work / "keys")
    mlp = models.mlp(work / "mlp.onnx")
    create_pack(mlp, work / "mlp-pack", name="mlp", version=1, key=key)
    digits = models.mlp(work / "digits.onnx", n_in=64, hidden=64, n_out=10, seed=1)
    inputs, outputs = models.golden_samples(digits, n_in=64)
    create_pack(
        digits, work / "digits-pack", name="digits", version=1, samples=Samples(inputs, outputs),
        key=key,
    )  # fmt: skip
    return pub, work / "mlp-pack", work / "digits-pack"


THROUGHPUTS = ("bento_rps_64", "bento_rps_1", "agent_mqtt_per_s", "agent_http_rps_16")
CPU_PER_REQUEST = ("bento_cpu_us_64", "bento_cpu_us_1", "agent_mqtt_cpu_us", "agent_http_cpu_us_16")
ERRORS = ("bento_non_2xx_64", "agent_mqtt_failed", "agent_http_non_2xx")


def _share(this: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    """One round: this tree's throughput as a share of the tree before's, and its CPU per request
    as a multiple of the tree before's (both sides measured minutes apart in the same round)."""
    out = {k: this[k] / max(before[k], 1e-9) for k in THROUGHPUTS}
    return out | {k: this[k] / max(before[k], 1e-9) for k in CPU_PER_REQUEST}


def run(results_dir: Path) -> dict[str, Any]:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-paths-") as tmp:
        work = Path(tmp)
        pub, mlp_pack, digits_pack = _packs(work)
        home = work / "bentoml"
        tag = import_to_store(mlp_pack, pub, home)
        trees = {"before": baseline_tree(work, BEFORE_COMMIT), "this": REPO}
        rounds_: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        n = rounds()
        broker = Mosquitto(workdir=work / "mosquitto").start()
        try:
            for i in range(n):
                order = list(trees) if i % 2 == 0 else list(trees)[::-1]
                for name in order:
                    console.print(f"round {i + 1}/{n}: {name} ...")
                    label = f"{name}-{i}"
                    figures = _bento(trees[name], home, tag, work, label)
                    figures |= _agent(trees[name], broker, digits_pack, pub, work, label)
                    rounds_[name].append(figures)
        finally:
            broker.stop()
    by_tree = {name: summarize(each, digits=2) for name, each in rounds_.items()}
    share = summarize(
        [_share(t, b) for t, b in zip(rounds_["this"], rounds_["before"], strict=True)]
    )
    table = Table(title=f"the serving and agent paths, before and after (median of {n} rounds)")
    for col in ("path", "before", "this tree", "this / before (range)"):
        table.add_column(col)
    for k in (*THROUGHPUTS, *CPU_PER_REQUEST):
        before, this = by_tree["before"][k]["median"], by_tree["this"][k]["median"]
        table.add_row(k, f"{before:.0f}", f"{this:.0f}", num(share[k], ".2f"))
    console.print(table)
    errors = sum(r[k] for r in rounds_["this"] for k in ERRORS)
    # Judged on the server's CPU per request (its capacity on these cores), not on throughput:
    # with the load generator and other work on the same 2 cores, the 64-client throughput ratio
    # of 3 rounds ranged 0.92-2.17 while their CPU per request ratio stayed within 0.67-0.81.
    targets = {
        f"{k}_capacity_keeps_{int(KEEP * 100)}pct": share[k]["median"] <= 1 / KEEP
        for k in CPU_PER_REQUEST
    }
    targets["no_failed_requests"] = errors == 0
    return {
        "headline": f"this tree / the tree before issue 18, median of {n} alternated rounds: "
        "server CPU per request "
        + ", ".join(f"{k} {num(share[k], '.2f')}" for k in CPU_PER_REQUEST)
        + "; throughput "
        + ", ".join(f"{k} {share[k]['median']:.2f}" for k in THROUGHPUTS),
        "targets_met": all(targets.values()),
        "targets": targets,
        "target_note": f"each path keeps at least {KEEP:.0%} of the tree before's capacity: the "
        f"server's CPU per request at most {1 / KEEP:.3f}x the tree before's, on the median of "
        "the rounds' ratios; no request fails in any round. Throughput ratios are reported: on a "
        "shared machine they follow the load more than the trees",
        "runs": n,
        "by_tree": by_tree,
        "share_of_before": share,
        "before_commit": BEFORE_COMMIT,
        "load_generator": "wrk on loopback (64 and 1 connections to BentoML, 16 to the agent's "
        "HTTP endpoint) and paho with 64 requests in flight to the agent over MQTT",
        "note": "2 shared cores: the load generator shares them with the server; the server's "
        "CPU per request (all its processes, `*_cpu_us*`) moves less with that than throughput. "
        "Ratios are taken within a round (this / before), then their median",
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
