"""Memory bounded per request: the peak RSS a request adds to the serving process, per MB of
request body, for tensor JSON (nested lists), tensor JSON with b64, and OIP's binary extension.

One ``bentoml serve`` worker with the default caps serves a model with wide rows (16,384 floats
in, their sum out), so the answer stays small and the figure is the request's own cost. RSS of
the whole process tree is sampled every 2 ms while each request runs; the figure is the peak
minus the RSS just before, over the body size. A JSON body past the number cap (19 MB here) is
refused before it is parsed: its row shows what refusing costs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.serving_common import import_to_store, start_bento

WIDTH = 16384
MB = 1 << 20


def _tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def _peak_during(pid: int, send: Any) -> tuple[int, int, Any]:
    base = _tree_rss(pid)
    peak, done = base, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = send()
    finally:
        time.sleep(0.05)
        done.set()
        sampler.join()
    return base, peak, reply


def _rows_for(megabytes: float, bytes_per_row: float) -> int:
    return max(1, int(megabytes * MB / bytes_per_row))


def _json_body(rows: int, rng: np.random.Generator) -> bytes:
    x = rng.standard_normal((rows, WIDTH)).round(3)  # short numbers, as a client would send
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def _b64_body(rows: int, rng: np.random.Generator) -> bytes:
    x = rng.standard_normal((rows, WIDTH)).astype(np.float32)
    tensor = {
        "dtype": "float32",
        "shape": [rows, WIDTH],
        "b64": base64.b64encode(x.tobytes()).decode(),
    }
    return json.dumps({"inputs": {"x": tensor}}).encode()


def _binary_body(rows: int, rng: np.random.Generator) -> tuple[bytes, dict[str, str]]:
    x = rng.standard_normal((rows, WIDTH)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    return header + x.tobytes(), {"inference-header-content-length": str(len(header))}


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import create_pack, generate_keypair
    from tests.support import serving_models

    console = Console()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        model = serving_models.wide(work / "wide.onnx", WIDTH)
        key, pub = generate_keypair(work / "keys")
        create_pack(model, work / "pack", name="wide", version=1, key=key)
        tag = import_to_store(work / "pack", pub, work / "bentoml")
        json_row = len(_json_body(1, rng))
        plans: dict[str, list[tuple[float, bytes, str, dict[str, str]]]] = {
            "json": [
                (mb, _json_body(_rows_for(mb, json_row), rng), "/predict", {})
                for mb in (1, 2, 4, 19)
            ],
            "b64": [
                (mb, _b64_body(_rows_for(mb, WIDTH * 4 * 4 / 3), rng), "/predict", {})
                for mb in (1, 4, 16)
            ],
            "binary": [(mb, *_binary_body(_rows_for(mb, WIDTH * 4), rng)) for mb in (1, 4, 16, 48)],
        }
        plans["binary"] = [(mb, b, "/v2/models/wide/infer", h) for mb, b, h in plans["binary"]]  # type: ignore[misc]
        for kind, cases in plans.items():
            # A fresh worker per kind: memory one kind freed is not mistaken for the next's.
            server = start_bento(work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
            try:
                with httpx.Client(timeout=120) as http:
                    http.post(server.url + "/predict", content=_b64_body(1, rng))  # warm
                    for _, body, path, headers in cases:
                        url = server.url + path
                        base, peak, reply = _peak_during(
                            server.popen.pid,
                            lambda u=url, b=body, h=headers: http.post(u, content=b, headers=h),  # type: ignore[misc]
                        )
                        size = len(body) / MB
                        rows.append(
                            {
                                "kind": kind,
                                "body_mb": round(size, 1),
                                "status": reply.status_code,
                                "peak_added_mb": round((peak - base) / MB, 1),
                                "peak_per_body_mb": round((peak - base) / MB / size, 2),
                            }
                        )
                        console.print(rows[-1])
            finally:
                server.stop()
    table = Table(title="peak RSS a request adds, per MB of body (one worker)")
    for col in ("body", "MB", "status", "peak added", "per MB"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["kind"],
            f"{r['body_mb']}",
            str(r["status"]),
            f"{r['peak_added_mb']} MB",
            f"{r['peak_per_body_mb']}",
        )
    console.print(table)

    def worst(kind: str) -> float:
        return max(r["peak_per_body_mb"] for r in rows if r["kind"] == kind and r["status"] == 200)

    refused = next(r for r in rows if r["kind"] == "json" and r["body_mb"] > 10)
    return {
        "headline": (
            f"peak RSS per MB of body: JSON {worst('json'):.1f}, b64 {worst('b64'):.1f}, "
            f"binary {worst('binary'):.1f}; a {refused['body_mb']:.0f} MB JSON body refused "
            f"({refused['status']}) for {refused['peak_added_mb']:.0f} MB"
        ),
        "targets_met": refused["status"] == 413 and worst("binary") <= 4,
        "per_mb": {"json": worst("json"), "b64": worst("b64"), "binary": worst("binary")},
        "figures": rows,
        "note": "RSS sampled every 2 ms; the allocator may keep freed memory, so a figure is an upper bound",
    }
