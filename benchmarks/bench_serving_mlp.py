"""Small model (overhead-bound): the Flask baseline vs the BentoML service vs raw onnxruntime.

Side by side in one run, with wrk on loopback: 64 concurrent clients (throughput, p99, non-2xx)
and one client (p50: adaptive batching must not make a lone request wait). The load generator
shares the machine's two cores with the server, as it did for the seed's figures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.serving_common import import_to_store, start_bento, start_flask, wrk

SECONDS = 10.0
CLIENTS = 64


def _raw_ort(model: Path, body: dict[str, Any], seconds: float = 3.0) -> float:
    """Requests/s of session.run on the same one-row input, in process (no HTTP, no JSON)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = {"x": np.asarray(body["inputs"]["x"], dtype=np.float32)}
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        count += 1
    return count / (time.perf_counter() - start)


def _measure(url: str, bodies: list[bytes]) -> dict[str, Any]:
    many = wrk(url, bodies, CLIENTS, SECONDS)
    one = wrk(url, bodies, 1, SECONDS / 2, threads=1)
    return {"clients_64": many.as_dict(), "clients_1": one.as_dict()}


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import generate_keypair
    from modelpack.pack import create_pack
    from tests.support import models

    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        model = models.mlp(work / "mlp.onnx")
        key, pub = generate_keypair(work / "keys")
        create_pack(model, work / "pack", name="mlp", version=1, key=key)
        tag = import_to_store(work / "pack", pub, work / "bentoml")
        rng = np.random.default_rng(0)
        rows = [rng.standard_normal((1, 8)).round(4).tolist() for _ in range(64)]
        bodies = [json.dumps({"inputs": {"x": r}}).encode() for r in rows]

        figures: dict[str, Any] = {}
        flask = start_flask(model, work)
        try:
            console.print("flask baseline ...")
            figures["flask"] = _measure(flask.url + "/api/predict", bodies)
        finally:
            flask.stop()
        bento = start_bento(work / "bentoml", tag, work)
        try:
            console.print("edgebento BentoML service ...")
            figures["edgebento"] = _measure(bento.url + "/predict", bodies)
        finally:
            bento.stop()
        figures["raw_onnxruntime_rps"] = round(_raw_ort(model, json.loads(bodies[0])), 1)

    ours, base = figures["edgebento"], figures["flask"]
    targets = {
        "throughput_at_least_flask": ours["clients_64"]["requests_per_s"]
        >= base["clients_64"]["requests_per_s"],
        "zero_non_2xx": ours["clients_64"]["non_2xx"] == 0
        and ours["clients_64"]["socket_errors"] == 0,
        "p99_le_50ms": ours["clients_64"]["p99_ms"] <= 50,
        "p50_one_client_le_3ms": ours["clients_1"]["p50_ms"] <= 3,
    }
    table = Table(title="small MLP over HTTP (wrk, loopback)")
    for col in ("server", "req/s @64", "p50 @64", "p99 @64", "non-2xx", "p50 @1"):
        table.add_column(col)
    for name in ("flask", "edgebento"):
        f = figures[name]
        table.add_row(
            name,
            f"{f['clients_64']['requests_per_s']:.0f}",
            f"{f['clients_64']['p50_ms']:.1f} ms",
            f"{f['clients_64']['p99_ms']:.1f} ms",
            str(f["clients_64"]["non_2xx"]),
            f"{f['clients_1']['p50_ms']:.2f} ms",
        )
    table.add_row("raw onnxruntime", f"{figures['raw_onnxruntime_rps']:.0f}", "-", "-", "-", "-")
    console.print(table)
    ratio = ours["clients_64"]["requests_per_s"] / max(base["clients_64"]["requests_per_s"], 1)
    return {
        "headline": (
            f"{ours['clients_64']['requests_per_s']:.0f} req/s vs Flask "
            f"{base['clients_64']['requests_per_s']:.0f} ({ratio:.2f}x) at 64 clients, "
            f"p99 {ours['clients_64']['p99_ms']:.1f} ms, p50@1 {ours['clients_1']['p50_ms']:.2f} ms"
        ),
        "targets_met": all(targets.values()),
        "targets": targets,
        "figures": figures,
        "load_generator": f"wrk, {CLIENTS} and 1 connections, {SECONDS:.0f} s / {SECONDS / 2:.0f} s, loopback",
        "note": "2 shared cores (load generator, server and other work on the same machine): noisy",
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
