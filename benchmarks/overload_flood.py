"""One open-loop flood and its verdict, for the overload benchmark
(``benchmarks/bench_serving_overload.py``): the request bodies of each path, the capacity, the
flood at ``FACTOR`` times it, and what the client saw (statuses, goodput, the slowest answer,
recovery).

Goodput counts the answers a client can use: a 200 of a request sent during the flood, answered
within the deadline plus one batch (``DEADLINE_S`` plus the server's slowest single request,
timed at the client: the bound edgebento's answers are held to). A server without admission control
answers every request with a 200 in the end, but after a queue of seconds; those late 200s are
reported apart (``answered_200_rps``), not as goodput.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.open_loop import ERRORS, Shot, closed_loop, open_loop, run_loop
from benchmarks.runs import load, measured
from benchmarks.serving_common import (
    REPO,
    Process,
    import_to_store,
    row_cost_model,
    start_bare_asgi,
    start_bento,
    start_plain_bento,
)

CAPACITY_S, FLOOD_S, RECOVERY_S, FACTOR = 4.0, 8.0, 2.0, 4.0
DEADLINE_S = 2.0
WIDTH = 256


def _bodies(path: str, rng: np.random.Generator, n: int = 64) -> tuple[list[bytes], dict[str, str]]:
    xs = [rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(n)]
    if path == "tensor_json":
        return [json.dumps({"inputs": {"x": x.tolist()}}).encode() for x in xs], {}
    if path == "tensor_b64":
        return [
            json.dumps(
                {
                    "inputs": {
                        "x": {
                            "dtype": "float32",
                            "shape": [1, WIDTH],
                            "b64": base64.b64encode(x.tobytes()).decode(),
                        }
                    }
                }
            ).encode()
            for x in xs
        ], {}
    if path == "oip_json":
        return [
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, WIDTH],
                            "datatype": "FP32",
                            "data": x.reshape(-1).tolist(),
                        }
                    ]
                }
            ).encode()
            for x in xs
        ], {}
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4 * WIDTH},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return [header + x.tobytes() for x in xs], {"inference-header-content-length": str(len(header))}


URLS = {
    "tensor_json": "/predict",
    "tensor_b64": "/predict",
    "oip_json": "/v2/models/slow/infer",
    "oip_binary": "/v2/models/slow/infer",
}
ROW_COST_LAYERS = 6  # row_cost_model of WIDTH: about 10-20 ms a row on one core here
MAX_BATCH_ROWS = 64  # the service's default


def one_batch_s(url: str, body: bytes, headers: dict[str, str], rounds: int = 50) -> float:
    import httpx

    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(rounds):
            start = time.perf_counter()
            http.post(url, content=body, headers=headers)
            times.append(time.perf_counter() - start)
    return max(times)


def full_batch_body(rows: int) -> bytes:
    x = np.random.default_rng(1).standard_normal((rows, WIDTH)).astype(np.float32)
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def judge(shots: list[Shot], capacity: float, flood_end: float, one_batch: float) -> dict[str, Any]:
    flood = [s for s in shots if s.scheduled < flood_end]
    after = [s for s in shots if s.scheduled >= flood_end]
    statuses: dict[str, int] = {}
    for s in shots:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    bound = DEADLINE_S + one_batch
    goodput = sum(s.status == 200 and s.served <= bound for s in flood) / FLOOD_S
    answered = sum(s.status == 200 for s in flood) / FLOOD_S
    recovery: float | None = None  # None: not within the run
    for index, s in enumerate(after):
        if all(t.status == 200 and t.latency < 0.25 for t in after[index:]):
            recovery = max(0.0, s.scheduled - flood_end)
            break
    slowest = max(s.served for s in shots)
    lag = max(s.latency - s.served for s in shots)
    return {
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(capacity * FACTOR, 1),
        "statuses": statuses,
        "goodput_rps": round(goodput, 1),
        "goodput_of_capacity": round(goodput / capacity, 3),
        "answered_200_rps": round(answered, 1),
        "slowest_s": round(slowest, 3),
        "deadline_plus_one_batch_s": round(bound, 3),
        "slowest_from_schedule_s": round(max(s.latency for s in shots), 3),
        "generator_lag_max_s": round(lag, 3),
        "p99_flood_s": round(float(np.percentile([s.served for s in flood], 99)), 3),
        "p99_ok_s": round(
            float(np.percentile([s.served for s in shots if s.status == 200] or [0.0], 99)), 3
        ),
        "recovery_s": None if recovery is None else round(recovery, 3),
        # Answers past the bound, and when they came (seconds after the flood began).
        "over_bound": sum(s.served > bound for s in shots),
        "over_bound_at_s": sorted(
            {round(s.scheduled - shots[0].scheduled, 1) for s in shots if s.served > bound}
        )[:20],
        "targets": {
            "only_200_and_503": set(statuses) <= {"200", "503"},
            "slowest_le_deadline_plus_one_batch": slowest <= bound,
            "goodput_ge_90pct_of_capacity": goodput >= 0.9 * capacity,
            "recovery_le_1s": recovery is not None and recovery <= 1.0,
        },
    }


def run_path(
    server: Process, path: str, batch_body: bytes | None = None, route: str | None = None
) -> dict[str, Any]:
    """``batch_body``: a request of a full batch's rows, whose time is "one batch" (else one
    request is); ``route``: the server's own for the path (a baseline's).

    The server's CPU is measured in both phases: other work on the machine moves how much CPU
    it gets from one phase to the next, and so the wall-clock share of capacity; the share per
    CPU-second it was given (``goodput_per_cpu_of_capacity``) does not move with it."""
    bodies, headers = _bodies(path, np.random.default_rng(0))
    url = server.url + (route if route is not None else URLS[path])
    if batch_body is None:
        one_batch = one_batch_s(url, bodies[0], headers)
    else:
        one_batch = one_batch_s(url, batch_body, headers, rounds=5)
    capacity, capacity_cpu = measured(
        server.popen.pid, lambda: run_loop(closed_loop(url, bodies, headers, CAPACITY_S))
    )
    # The generator yields the CPU to the server it measures (they share the cores): its own
    # lag is reported apart, and the slowest answer is timed from the real send.
    phases = [(capacity * FACTOR, FLOOD_S), (capacity / 2, RECOVERY_S)]
    ERRORS.clear()
    load_before = load()
    shots, flood_cpu = measured(
        server.popen.pid, lambda: run_loop(open_loop(url, bodies, headers, phases))
    )
    flood_end = shots[0].scheduled + FLOOD_S if shots else 0.0
    verdict = judge(shots, capacity, flood_end, one_batch)
    # 200s within the bound per CPU-second, in the flood and its recovery (and a baseline's
    # drain, whose late answers cost CPU too), over the capacity phase's 200s per CPU-second.
    useful = sum(
        s.status == 200 and s.served <= verdict["deadline_plus_one_batch_s"] for s in shots
    )
    per_cpu = (useful / flood_cpu) / (capacity * CAPACITY_S / capacity_cpu) if flood_cpu else None
    return {
        **verdict,
        "server_cpu_s": {"capacity": round(capacity_cpu, 2), "flood": round(flood_cpu, 2)},
        "goodput_per_cpu_of_capacity": None if per_cpu is None else round(per_cpu, 3),
        "connection_errors": dict(ERRORS),
        "load_before": load_before,
    }


DEPTH = 128  # the model of the targets: 128 MatMul+Tanh of 256, about 1.4 ms a request here
CURVE_DEPTHS = (256, 512)  # the same flood on costlier models (tensor JSON only)


_TAGS: dict[Path, str] = {}


def serve_slow(work: Path, key: Path, pub: Path, depth: int, repo: Path = REPO) -> Process:
    """The fixed-cost model (``depth`` > 0), one request per batch; or (``depth`` 0) the
    row-cost model, batched up to the service's default."""
    from modelpack import create_pack
    from tests.support import serving_models

    pack = work / f"pack-{depth}"
    if not pack.exists():
        if depth:
            model = serving_models.slow(work / f"slow-{depth}.onnx", width=WIDTH, depth=depth)
        else:
            model = row_cost_model(work / "row-cost.onnx", WIDTH, ROW_COST_LAYERS)
        create_pack(model, pack, name="slow", version=1, key=key)
    home = work / f"bentoml-{depth}"
    if home not in _TAGS:  # imported once; every tree serves it from the same store
        _TAGS[home] = import_to_store(pack, pub, home)
    tag = _TAGS[home]
    return start_bento(
        home,
        tag,
        work,
        repo,
        EDGEBENTO_WORKERS="1",
        EDGEBENTO_THREADS="1",
        EDGEBENTO_MAX_BATCH=str(MAX_BATCH_ROWS if depth == 0 else 1),
        EDGEBENTO_DEADLINE_S=str(DEADLINE_S),
    )


def flood_edgebento(
    work: Path, key: Path, pub: Path, depth: int, paths: list[str], repo: Path
) -> dict[str, Any]:
    server = serve_slow(work, key, pub, depth, repo)
    try:
        batch = full_batch_body(MAX_BATCH_ROWS) if depth == 0 else None
        return {path: run_path(server, path, batch) for path in paths}
    finally:
        server.stop()


BASELINE_ROUTES = {"plain_bentoml": "/predict", "bare_asgi": "/"}


def flood_baseline(work: Path, kind: str) -> dict[str, Any]:
    """The tensor JSON flood on a baseline serving the fixed-cost model with one worker and one
    ONNX Runtime thread, as edgebento's service runs it here: the plain BentoML service
    (``plain_bentoml``) or the bare ASGI app (``bare_asgi``)."""
    from tests.support import serving_models

    model = work / f"slow-{DEPTH}.onnx"
    if not model.exists():
        serving_models.slow(model, width=WIDTH, depth=DEPTH)
    start = start_plain_bento if kind == "plain_bentoml" else start_bare_asgi
    server = start(model, work, 1)
    try:
        return run_path(server, "tensor_json", route=BASELINE_ROUTES[kind])
    finally:
        server.stop()
