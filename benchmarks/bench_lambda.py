"""The Lambda handler: cold start (import plus verified load, in a fresh process) and warm
overhead over raw onnxruntime on the same input, side by side in one run.

The packs are made, and one untimed cold start per pack reads the code and the libraries into
the page cache, once; then ``EDGEBENTO_BENCH_RUNS`` rounds (3 by default) each time the cold
starts (``COLD_RUNS`` fresh processes per pack, their median) and the warm calls (raw
onnxruntime, the handler direct and through an HTTP API v2 event, in an order that rotates each
round). Each figure is the median of its rounds with its range; the overhead is taken within a
round, against that round's raw figure; the targets are judged on the medians."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.runs import load, median_of, summarize
from benchmarks.serving_common import REPO

COLD_RUNS = 5
WARM_CALLS = 2000

COLD = """
import time
t0, c0 = time.perf_counter(), time.process_time()
import bentos.lambda_handler as h
t1 = time.perf_counter()
h.get_core()
t2, c2 = time.perf_counter(), time.process_time()
print(t1 - t0, t2 - t1, c2 - c0)
"""


def cold_start(pack: Path, pub: Path, runs: int = COLD_RUNS) -> dict[str, float]:
    """``runs`` fresh processes: the best one's import and load, the median total, and the median
    CPU time of the same (all the process's threads), which other work on the machine moves
    less than the wall time."""
    env = {**os.environ, "EDGEBENTO_PACK": str(pack), "EDGEBENTO_TRUST": str(pub)}
    found: list[tuple[float, float]] = []
    cpu: list[float] = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        found.append((float(out[0]), float(out[1])))
        cpu.append(float(out[2]))
    best = min(found, key=sum)
    median = statistics.median(sum(r) for r in found)
    return {
        "import_s": round(best[0], 3),
        "load_s": round(best[1], 3),
        "total_best_s": round(sum(best), 3),
        "total_median_s": round(median, 3),
        "cpu_median_s": round(statistics.median(cpu), 3),
    }


def _median_us(fn: Any, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _rounds() -> int:
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


WARM_PATHS = ("raw_onnxruntime_us", "handler_direct_us", "handler_http_v2_us")


def warm_calls(pack: Path, pub: Path, row: list[list[float]]) -> dict[str, Callable[[], Any]]:
    """The three warm calls on the same input, each made once already (loaded, warmed)."""
    import onnxruntime as ort

    from bentos import lambda_handler

    os.environ["EDGEBENTO_PACK"], os.environ["EDGEBENTO_TRUST"] = str(pack), str(pub)
    lambda_handler.reset()
    event = {"inputs": {"x": row}}
    http = {
        "version": "2.0",
        "rawPath": "/predict",
        "requestContext": {"http": {"method": "POST", "path": "/predict"}},
        "body": json.dumps(event),
        "isBase64Encoded": False,
    }
    lambda_handler.handler(event, None)
    session = ort.InferenceSession(str(pack / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"x": np.asarray(row, dtype=np.float32)}
    session.run(None, feed)
    return {
        "raw_onnxruntime_us": lambda: session.run(None, feed),
        "handler_direct_us": lambda: lambda_handler.handler(event, None),
        "handler_http_v2_us": lambda: lambda_handler.handler(http, None),
    }


def warm_overhead(calls: dict[str, Callable[[], Any]], order: list[str]) -> dict[str, float]:
    """One round: the median time of each call, measured in ``order``, and the handler's
    overhead over raw onnxruntime in this round."""
    us = {name: _median_us(calls[name], WARM_CALLS) for name in order}
    raw, direct, via_http = (us[name] for name in WARM_PATHS)
    return {
        **{name: round(us[name], 1) for name in WARM_PATHS},
        "overhead_direct_us": round(direct - raw, 1),
        "overhead_http_v2_us": round(via_http - raw, 1),
    }


def run(results_dir: Path) -> dict[str, Any]:
    from bentos import lambda_handler
    from modelpack import create_pack, generate_keypair
    from tests.support import models

    console = Console()
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-lambda-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        mlp = models.mlp(work / "mlp.onnx")
        create_pack(mlp, work / "mlp", name="mlp", version=1, key=key)
        packs = {"cold_start_mlp": work / "mlp"}
        int8 = REPO / "build" / "bench-serving" / "minilm-int8.onnx"
        if int8.exists():  # written by bench_serving_minilm
            create_pack(int8, work / "minilm", name="minilm", version=1, key=key)
            packs["cold_start_minilm_int8"] = work / "minilm"
        for pack in packs.values():  # untimed: the page cache holds the code and libraries after
            cold_start(pack, pub, runs=1)
        row = np.random.default_rng(0).standard_normal((1, 8)).round(4).tolist()
        calls = warm_calls(work / "mlp", pub, row)
        try:
            for r in range(_rounds()):
                console.print(f"round {r + 1}: cold starts and warm calls ...")
                order = [WARM_PATHS[(r + i) % len(WARM_PATHS)] for i in range(len(WARM_PATHS))]
                one: dict[str, Any] = {"load_before": load(), "warm_order": order}
                one |= {name: cold_start(pack, pub) for name, pack in packs.items()}
                one["warm_mlp"] = warm_overhead(calls, order)
                per_round.append(one)
        finally:
            lambda_handler.reset()
    figures = {name: summarize([r[name] for r in per_round]) for name in [*packs, "warm_mlp"]}
    colds = [median_of(figures[name]["total_median_s"]) for name in packs]
    cold_cpu = max(median_of(figures[name]["cpu_median_s"]) for name in packs)
    warm = {k: median_of(v) for k, v in figures["warm_mlp"].items()}
    targets = {
        "cold_start_le_1.5s": max(colds) <= 1.5,
        "warm_overhead_le_1ms": warm["overhead_direct_us"] <= 1000,
    }
    table = Table(title="Lambda handler (median of the rounds)")
    table.add_column("measure")
    table.add_column("value")
    for name, value in figures.items():
        for k, v in value.items():
            table.add_row(f"{name}.{k}", str(median_of(v)))
    console.print(table)
    n = len(per_round)
    return {
        "headline": (
            f"cold start {max(colds):.2f} s (median, largest pack; {cold_cpu:.2f} s of CPU), "
            "warm overhead "
            f"{warm['overhead_direct_us']:.0f} us direct / {warm['overhead_http_v2_us']:.0f} us HTTP "
            f"over raw ORT {warm['raw_onnxruntime_us']:.0f} us (medians of {n} runs)"
        ),
        "targets_met": all(targets.values()),
        "targets": targets,
        "runs": n,
        "figures": figures,
        "per_round": [
            {
                "round": i + 1,
                "load_1m": r["load_before"]["load_1m"],
                **{f"{name}_s": r[name]["total_median_s"] for name in packs},
                **{f"{name}_cpu_s": r[name]["cpu_median_s"] for name in packs},
                "raw_us": r["warm_mlp"]["raw_onnxruntime_us"],
                "overhead_direct_us": r["warm_mlp"]["overhead_direct_us"],
                "overhead_http_v2_us": r["warm_mlp"]["overhead_http_v2_us"],
            }
            for i, r in enumerate(per_round)
        ],
        "note": (
            f"cold start = python import of the handler + verified load, the median of {COLD_RUNS} "
            "fresh processes per round after one untimed start per pack (page cache warm); warm "
            f"figures: the median of {WARM_CALLS} calls per round; targets judged on the medians"
        ),
    }
