"""Memory bounded per request: the peak RSS a request adds to the serving process, per MB of
request body, for tensor JSON (nested lists), tensor JSON with b64, and OIP's binary extension.

One ``bentoml serve`` worker with the default caps serves a model with wide rows (16,384 floats
in, their sum out), so the answer stays small and the figure is the request's own cost. The
peak of each process of the tree is its VmHWM, set back to its RSS just before each request
(``/proc/PID/clear_refs``), so a peak shorter than any sampling interval is still seen (sampling
every 2 ms, as before, missed the peak of the smallest bodies in some runs: 1 MB of OIP binary
measured 1.37 to 1.96 MB per MB across three rounds). The figure is the sum of those peaks minus
the RSS just before, over the body size. A JSON body past the number cap (19 MB here) is
refused before it is parsed: its row shows what refusing costs.

The model, the pack and the bodies are made once; then ``EDGEBENTO_BENCH_RUNS`` rounds (3 by
default) each start a fresh worker per kind, in an order that rotates each round, and send it
that kind's bodies. Each figure is the median of its rounds with its range; the target is
judged on the medians.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.runs import load, median_of, summary
from benchmarks.serving_common import Process, import_to_store, start_bento

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


def _reset_peaks(pids: list[int]) -> bool:
    """Set each process's VmHWM (its peak RSS) back to its RSS now; False where the kernel or
    the permissions do not allow it (then the 2 ms samples alone say the peak)."""
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peaks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, AttributeError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    return total


def _peak_during(pid: int, send: Any) -> tuple[int, int, Any]:
    import psutil

    pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    exact = _reset_peaks(pids)
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
    if exact:  # each process's own peak; their sum bounds the tree's from above
        peak = max(peak, _peaks(pids))
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


def _rounds() -> int:
    import os

    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


Case = tuple[float, bytes, str, dict[str, str]]


def _plans(rng: np.random.Generator) -> dict[str, list[Case]]:
    json_row = len(_json_body(1, rng))
    b64 = [(mb, _b64_body(_rows_for(mb, WIDTH * 4 * 4 / 3), rng)) for mb in (1, 4, 16)]
    binary = [(mb, *_binary_body(_rows_for(mb, WIDTH * 4), rng)) for mb in (1, 4, 16, 48)]
    return {
        "json": [
            (mb, _json_body(_rows_for(mb, json_row), rng), "/predict", {}) for mb in (1, 2, 4, 19)
        ],
        "b64": [(mb, body, "/predict", {}) for mb, body in b64],
        "binary": [(mb, body, "/v2/models/wide/infer", h) for mb, body, h in binary],
    }


def _measure_kind(
    server: Process, kind: str, cases: list[Case], warm: bytes
) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(timeout=120) as http:
        http.post(server.url + "/predict", content=warm)
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
    return rows


def _merged(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each case's median over the rounds, with the range of its figure per MB of body."""
    out = []
    for cases in zip(*per_round, strict=True):
        per_mb = [c["peak_per_body_mb"] for c in cases]
        statuses = sorted({c["status"] for c in cases})
        out.append(
            {
                "kind": cases[0]["kind"],
                "body_mb": cases[0]["body_mb"],
                "status": statuses[0] if len(statuses) == 1 else "/".join(map(str, statuses)),
                "peak_added_mb": summary((c["peak_added_mb"] for c in cases), 1)["median"],
                "peak_per_body_mb": summary(per_mb, 2)["median"],
                "peak_per_body_mb_min": min(per_mb),
                "peak_per_body_mb_max": max(per_mb),
            }
        )
    return out


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import create_pack, generate_keypair
    from tests.support import serving_models

    console = Console()
    rng = np.random.default_rng(0)
    kinds = ("json", "b64", "binary")
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        model = serving_models.wide(work / "wide.onnx", WIDTH)
        key, pub = generate_keypair(work / "keys")
        create_pack(model, work / "pack", name="wide", version=1, key=key)
        tag = import_to_store(work / "pack", pub, work / "bentoml")
        plans, warm = _plans(rng), _b64_body(1, rng)
        for r in range(_rounds()):
            order = [kinds[(r + i) % len(kinds)] for i in range(len(kinds))]
            one: dict[str, Any] = {"order": order, "load_before": load()}
            for kind in order:
                # A fresh worker per kind: memory one kind freed is not mistaken for the next's.
                console.print(f"round {r + 1}: {kind} ...")
                server = start_bento(work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
                try:
                    one[kind] = _measure_kind(server, kind, plans[kind], warm)
                finally:
                    server.stop()
            rounds.append(one)
    per_round = [[c for kind in kinds for c in one[kind]] for one in rounds]
    rows = _merged(per_round)
    table = Table(title="peak RSS a request adds, per MB of body (one worker, median of rounds)")
    for col in ("body", "MB", "status", "peak added", "per MB", "range"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["kind"],
            f"{row['body_mb']}",
            str(row["status"]),
            f"{row['peak_added_mb']} MB",
            f"{row['peak_per_body_mb']}",
            f"{row['peak_per_body_mb_min']}-{row['peak_per_body_mb_max']}",
        )
    console.print(table)

    def worst(cases: list[dict[str, Any]], kind: str) -> float:
        return max(c["peak_per_body_mb"] for c in cases if c["kind"] == kind and c["status"] == 200)

    def refused(cases: list[dict[str, Any]]) -> dict[str, Any]:
        return next(c for c in cases if c["kind"] == "json" and c["body_mb"] > 10)

    # Each round's worst case per kind, then their median: the target's figure.
    per_mb = {kind: summary((worst(cases, kind) for cases in per_round), 2) for kind in kinds}
    refusals = [refused(cases) for cases in per_round]
    refused_mb = summary((c["peak_added_mb"] for c in refusals), 1)
    body_mb = refusals[0]["body_mb"]
    n = len(rounds)
    med = {kind: median_of(per_mb[kind]) for kind in kinds}
    return {
        "headline": (
            f"peak RSS per MB of body: JSON {med['json']:.1f}, b64 {med['b64']:.1f}, "
            f"binary {med['binary']:.1f}; a {body_mb:.0f} MB JSON body refused "
            f"({refusals[0]['status']}) for {median_of(refused_mb):.0f} MB (medians of {n} runs)"
        ),
        "targets_met": all(c["status"] == 413 for c in refusals) and med["binary"] <= 4,
        "runs": n,
        "per_mb": per_mb,
        "refused_json_peak_added_mb": refused_mb,
        "figures": rows,
        "per_round": [
            {
                "round": i + 1,
                "order": " ".join(one["order"]),
                "load_1m": one["load_before"]["load_1m"],
                **{f"{kind}_per_mb": worst(per_round[i], kind) for kind in kinds},
                "refused_json_mb": refused(per_round[i])["peak_added_mb"],
            }
            for i, one in enumerate(rounds)
        ],
        "note": (
            "peak RSS from each process's VmHWM, reset before each request, and samples every 2 ms; "
            "the allocator may keep freed memory, so a figure is an upper bound; a fresh worker "
            "per kind and round; targets judged on the medians"
        ),
    }
