"""The Lambda handler: cold start (import plus verified load, in a fresh process) and warm
overhead over raw onnxruntime on the same input, side by side in one run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.serving_common import REPO

COLD_RUNS = 5
WARM_CALLS = 2000

COLD = """
import time
t0 = time.perf_counter()
import bentos.lambda_handler as h
t1 = time.perf_counter()
h.get_core()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def cold_start(pack: Path, pub: Path) -> dict[str, float]:
    env = {**os.environ, "EDGEBENTO_PACK": str(pack), "EDGEBENTO_TRUST": str(pub)}
    runs = []
    for _ in range(COLD_RUNS):
        out = subprocess.run(
            [sys.executable, "-c", COLD],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    best = min(runs, key=sum)
    median = statistics.median(sum(r) for r in runs)
    return {
        "import_s": round(best[0], 3),
        "load_s": round(best[1], 3),
        "total_best_s": round(sum(best), 3),
        "total_median_s": round(median, 3),
    }


def _median_us(fn: Any, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def warm_overhead(pack: Path, pub: Path, row: list[list[float]]) -> dict[str, float]:
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
    raw = _median_us(lambda: session.run(None, feed), WARM_CALLS)
    direct = _median_us(lambda: lambda_handler.handler(event, None), WARM_CALLS)
    via_http = _median_us(lambda: lambda_handler.handler(http, None), WARM_CALLS)
    lambda_handler.reset()
    return {
        "raw_onnxruntime_us": round(raw, 1),
        "handler_direct_us": round(direct, 1),
        "handler_http_v2_us": round(via_http, 1),
        "overhead_direct_us": round(direct - raw, 1),
        "overhead_http_v2_us": round(via_http - raw, 1),
    }


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import create_pack, generate_keypair
    from tests.support import models

    console = Console()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lambda-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        mlp = models.mlp(work / "mlp.onnx")
        create_pack(mlp, work / "mlp", name="mlp", version=1, key=key)
        console.print("cold starts ...")
        figures["cold_start_mlp"] = cold_start(work / "mlp", pub)
        int8 = REPO / "build" / "bench-serving" / "minilm-int8.onnx"
        if int8.exists():  # written by bench_serving_minilm
            create_pack(int8, work / "minilm", name="minilm", version=1, key=key)
            figures["cold_start_minilm_int8"] = cold_start(work / "minilm", pub)
        console.print("warm calls ...")
        row = np.random.default_rng(0).standard_normal((1, 8)).round(4).tolist()
        figures["warm_mlp"] = warm_overhead(work / "mlp", pub, row)
    colds = [v["total_median_s"] for k, v in figures.items() if k.startswith("cold_start")]
    warm = figures["warm_mlp"]
    targets = {
        "cold_start_le_1.5s": max(colds) <= 1.5,
        "warm_overhead_le_1ms": warm["overhead_direct_us"] <= 1000,
    }
    table = Table(title="Lambda handler")
    table.add_column("measure")
    table.add_column("value")
    for name, value in figures.items():
        for k, v in value.items():
            table.add_row(f"{name}.{k}", str(v))
    console.print(table)
    return {
        "headline": (
            f"cold start {max(colds):.2f} s (median, largest pack), warm overhead "
            f"{warm['overhead_direct_us']:.0f} us direct / {warm['overhead_http_v2_us']:.0f} us HTTP "
            f"over raw ORT {warm['raw_onnxruntime_us']:.0f} us"
        ),
        "targets_met": all(targets.values()),
        "targets": targets,
        "figures": figures,
        "note": "2 shared cores: noisy; cold start = python import of the handler + verified load",
    }
