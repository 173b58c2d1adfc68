"""Overload: an open-loop flood at 4x the measured capacity for 8 s, on every request path.

A model of about 1.4 ms a request (``tests.support.serving_models.slow``, one request per batch,
one worker, one ORT thread) so that a Python load generator on the same two cores can reach 4x
its capacity; then the same flood on models of twice and four times the cost, which shows how
much of the goodput the HTTP work of refusing 3x capacity takes on two shared cores. For each path (tensor JSON, tensor JSON with b64, OIP JSON, OIP with Triton's
binary extension), in one run:

1. capacity: 200s per second with 64 closed-loop clients for 4 s;
2. the flood: requests sent on a fixed schedule (open loop: a late answer never delays the next
   send) at 4x capacity for 8 s; latency counts from the scheduled send time, so a stalled
   server cannot hide behind a stalled client (no coordinated omission);
3. recovery: the schedule drops to half the capacity for 2 s; recovery is how long after the
   flood every answer is a 200 again.

Latency is what the client sees: from the moment the generator starts the request (opening its
connection when it needs one) to the last byte of the answer, never the server's own count,
which starts when it reads the request.

Then the same flood on a model whose cost grows with its rows (``row_cost_model``: batching
saves nothing, a batch of 64 rows costs 64 rows), batched as the service batches by default,
tensor JSON: the deadline arithmetic must plan for the rows queued ahead and shrink a batch to
what the deadline allows.

With ``EDGEBENTO_BENCH_BASELINE=DIR`` (another checkout, such as ``git worktree add /tmp/base
REV``), every flood runs on that tree's service too, in the same run, side by side.

Targets (issues 10 and 18): only 200 and 503; the slowest answer at the client within the
deadline plus one batch; goodput at least 90% of capacity; normal service within 1 s.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.open_loop import ERRORS, Shot, closed_loop, open_loop, run_loop
from benchmarks.serving_common import REPO, Process, import_to_store, row_cost_model, start_bento

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


def _one_batch_s(url: str, body: bytes, headers: dict[str, str], rounds: int = 50) -> float:
    import httpx

    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(rounds):
            start = time.perf_counter()
            http.post(url, content=body, headers=headers)
            times.append(time.perf_counter() - start)
    return max(times)


def _full_batch_body(rows: int) -> bytes:
    x = np.random.default_rng(1).standard_normal((rows, WIDTH)).astype(np.float32)
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def _judge(
    shots: list[Shot], capacity: float, flood_end: float, one_batch: float
) -> dict[str, Any]:
    flood = [s for s in shots if s.scheduled < flood_end]
    after = [s for s in shots if s.scheduled >= flood_end]
    statuses: dict[str, int] = {}
    for s in shots:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    goodput = sum(s.status == 200 for s in flood) / FLOOD_S
    recovery = 0.0
    for index, s in enumerate(after):
        if all(t.status == 200 and t.latency < 0.25 for t in after[index:]):
            recovery = max(0.0, s.scheduled - flood_end)
            break
    else:
        recovery = float("inf")
    slowest = max(s.served for s in shots)
    lag = max(s.latency - s.served for s in shots)
    bound = DEADLINE_S + one_batch
    return {
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(capacity * FACTOR, 1),
        "statuses": statuses,
        "goodput_rps": round(goodput, 1),
        "goodput_of_capacity": round(goodput / capacity, 3),
        "slowest_s": round(slowest, 3),
        "deadline_plus_one_batch_s": round(bound, 3),
        "slowest_from_schedule_s": round(max(s.latency for s in shots), 3),
        "generator_lag_max_s": round(lag, 3),
        "p99_flood_s": round(float(np.percentile([s.served for s in flood], 99)), 3),
        "p99_ok_s": round(
            float(np.percentile([s.served for s in shots if s.status == 200] or [0.0], 99)), 3
        ),
        "recovery_s": round(recovery, 3),
        # Answers past the bound, and when they came (seconds after the flood began).
        "over_bound": sum(s.served > bound for s in shots),
        "over_bound_at_s": sorted(
            {round(s.scheduled - shots[0].scheduled, 1) for s in shots if s.served > bound}
        )[:20],
        "targets": {
            "only_200_and_503": set(statuses) <= {"200", "503"},
            "slowest_le_deadline_plus_one_batch": slowest <= bound,
            "goodput_ge_90pct_of_capacity": goodput >= 0.9 * capacity,
            "recovery_le_1s": recovery <= 1.0,
        },
    }


def _run_path(base: str, path: str, batch_body: bytes | None = None) -> dict[str, Any]:
    """``batch_body``: a request of a full batch's rows, whose time is "one batch" (else one
    request is)."""
    bodies, headers = _bodies(path, np.random.default_rng(0))
    url = base + URLS[path]
    if batch_body is None:
        one_batch = _one_batch_s(url, bodies[0], headers)
    else:
        one_batch = _one_batch_s(url, batch_body, headers, rounds=5)
    capacity = run_loop(closed_loop(url, bodies, headers, CAPACITY_S))
    # The generator yields the CPU to the server it measures (they share the cores): its own
    # lag is reported apart, and the slowest answer is timed from the real send.
    phases = [(capacity * FACTOR, FLOOD_S), (capacity / 2, RECOVERY_S)]
    ERRORS.clear()
    load_before = os.getloadavg()[0]
    shots = run_loop(open_loop(url, bodies, headers, phases))
    flood_end = shots[0].scheduled + FLOOD_S if shots else 0.0
    return {
        **_judge(shots, capacity, flood_end, one_batch),
        "connection_errors": dict(ERRORS),
        "load_average_1m_before": round(load_before, 2),
    }


DEPTH = 128  # the model of the targets: 128 MatMul+Tanh of 256, about 1.4 ms a request here
CURVE_DEPTHS = (256, 512)  # the same flood on costlier models (tensor JSON only)


_TAGS: dict[Path, str] = {}


def _serve_slow(work: Path, key: Path, pub: Path, depth: int, repo: Path = REPO) -> Process:
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


def _trees() -> dict[str, Path]:
    """This tree, and the baseline's when ``EDGEBENTO_BENCH_BASELINE`` names one."""
    trees = {"this": REPO}
    baseline = os.environ.get("EDGEBENTO_BENCH_BASELINE")
    if baseline:
        trees["baseline"] = Path(baseline).resolve()
    return trees


def _flood(
    work: Path, key: Path, pub: Path, depth: int, paths: list[str], repo: Path
) -> dict[str, Any]:
    server = _serve_slow(work, key, pub, depth, repo)
    try:
        batch = _full_batch_body(MAX_BATCH_ROWS) if depth == 0 else None
        return {path: _run_path(server.url, path, batch) for path in paths}
    finally:
        server.stop()


def _row(table: Table, label: str, f: dict[str, Any]) -> None:
    table.add_row(
        label,
        f"{f['capacity_rps']:.0f}/s",
        f"{f['goodput_rps']:.0f}/s ({f['goodput_of_capacity']:.0%})",
        " ".join(f"{k}:{v}" for k, v in sorted(f["statuses"].items())),
        f"{f['p99_ok_s']:.2f} s",
        f"{f['slowest_s']:.2f} s",
        f"{f['deadline_plus_one_batch_s']:.2f} s",
        f"{f['recovery_s']:.2f} s",
    )


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import generate_keypair

    console = Console()
    trees = _trees()
    quick = os.environ.get("EDGEBENTO_BENCH_QUICK") == "1"  # tensor JSON and the row cost only
    paths = ["tensor_json"] if quick else list(URLS)
    by_tree: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        for tree, repo in trees.items():
            console.print(f"\\[{tree}] floods on {', '.join(paths)} (fixed cost) ...")
            figures = _flood(work, key, pub, DEPTH, paths, repo)
            console.print(f"\\[{tree}] flood on the row-cost model ...")
            figures["row_cost"] = _flood(work, key, pub, 0, ["tensor_json"], repo)["tensor_json"]
            curve = []
            for depth in () if quick else CURVE_DEPTHS:
                console.print(f"\\[{tree}] flood on tensor_json, a model of depth {depth} ...")
                f = _flood(work, key, pub, depth, ["tensor_json"], repo)["tensor_json"]
                curve.append({"depth": depth, **_curve_point(f)})
            by_tree[tree] = {
                "figures": figures,
                "by_model_cost": [{"depth": DEPTH, **_curve_point(figures["tensor_json"])}, *curve],
            }
    table = Table(title=f"open-loop flood at {FACTOR:.0f}x capacity for {FLOOD_S:.0f} s")
    for col in (
        "path",
        "capacity",
        "goodput",
        "statuses",
        "p99 ok",
        "slowest",
        "bound",
        "recovery",
    ):
        table.add_column(col)
    for path in by_tree["this"]["figures"]:
        for tree, found in by_tree.items():
            _row(table, f"{path} ({tree})" if len(by_tree) > 1 else path, found["figures"][path])
    console.print(table)
    this = by_tree["this"]["figures"]
    met = all(all(f["targets"].values()) for f in this.values())
    worst = min(f["goodput_of_capacity"] for f in this.values())
    result: dict[str, Any] = {
        "headline": (
            f"4x flood, {len(this)} floods: goodput >= {worst:.0%} of capacity, slowest at the "
            f"client {max(f['slowest_s'] for f in this.values()):.2f} s (deadline "
            f"{DEADLINE_S:.0f} s; row-cost model {this['row_cost']['slowest_s']:.2f} s against "
            f"a bound of {this['row_cost']['deadline_plus_one_batch_s']:.2f} s), statuses "
            f"{sorted({k for f in this.values() for k in f['statuses']})}"
        ),
        "targets_met": met,
        "figures": this,
        "by_model_cost": by_tree["this"]["by_model_cost"],
        "setup": (
            f"slow model ({DEPTH} MatMul+Tanh of {WIDTH}), 1 worker, 1 ORT thread, 1 request per "
            f"batch; row-cost model ({ROW_COST_LAYERS} MatMul+Tanh of each row's {WIDTH}x{WIDTH} "
            f"outer product), batches up to {MAX_BATCH_ROWS} rows; deadline {DEADLINE_S} s, "
            "default queue of 256; an open-loop generator (asyncio protocols on uvloop) on the "
            "same two cores; latency at the client, from the start of each request"
        ),
        "note": "2 shared cores (load generator, server and other work on the same machine): noisy",
    }
    if "baseline" in by_tree:
        result["baseline"] = {"tree": str(trees["baseline"]), **by_tree["baseline"]}
    return result


def _curve_point(f: dict[str, Any]) -> dict[str, Any]:
    return {
        "ms_per_request_at_capacity": round(1000 / f["capacity_rps"], 2),
        "capacity_rps": f["capacity_rps"],
        "goodput_of_capacity": f["goodput_of_capacity"],
        "slowest_s": f["slowest_s"],
        "statuses": f["statuses"],
    }
