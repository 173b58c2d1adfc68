"""One open-loop flood and its verdict, for the overload benchmark
(``benchmarks/bench_serving_overload.py``): the request bodies of each path, the capacity, the
flood at ``FACTOR`` times it, and what the client saw (statuses, goodput, the slowest answer,
recovery).

Goodput counts the answers a client can use, per second of the flood: the 200s that came during
the flood, each within the deadline plus one batch of its send (``DEADLINE_S`` plus the server's
slowest single request, timed at the client: the bound edgebento's answers are held to), counted
when they came. Counted by send instead (every good 200 of a request sent during the flood), the
queue left at its end, up to a deadline's worth of work answered after it, added up to
``DEADLINE_S / FLOOD_S`` to the rate (a third for a 6 s flood): that figure is kept as
``goodput_by_send_of_capacity``. A server without admission control answers every request with a
200 in the end, but after a queue of seconds; those late 200s are reported apart
(``answered_200_rps``), not as goodput, and the answers still missing ``WAIT_S`` after the
schedule ended are counted as status -2 (unanswered), not awaited.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import thread_cpu
from benchmarks.open_loop import ERRORS, UNANSWERED, Shot, closed_loop, open_loop, run_loop
from benchmarks.pinning import Pinning
from benchmarks.runs import CpuMeter, load, measured
from benchmarks.serving_common import (
    REPO,
    Process,
    import_to_store,
    row_cost_model,
    start_bare_asgi,
    start_bento,
    start_plain_bento,
)

# Three rounds of every flood stay within about six minutes on two cores.
CAPACITY_S, FLOOD_S, RECOVERY_S, FACTOR = 3.0, 6.0, 2.0, 4.0
DEADLINE_S = 2.0
# Answers awaited after the schedule ends: edgebento answers all within the deadline plus one
# batch; a baseline's queue of a flood took 10-20 s more to drain, every answer of it late.
WAIT_S = DEADLINE_S + 5.0
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


@dataclass(frozen=True)
class Capacity:
    """A closed-loop capacity phase: 200s per second, and the server's CPU seconds, 200s and
    seconds over the window the rate is over."""

    rate: float
    cpu: float
    ok: int
    seconds: float


def judge(shots: list[Shot], capacity: float, flood_end: float, one_batch: float) -> dict[str, Any]:
    flood = [s for s in shots if s.scheduled < flood_end]
    after = [s for s in shots if s.scheduled >= flood_end]
    statuses: dict[str, int] = {}
    for s in shots:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    bound = DEADLINE_S + one_batch
    good = [s for s in shots if s.status == 200 and s.served <= bound]
    goodput = sum(s.scheduled + s.latency < flood_end for s in good) / FLOOD_S
    by_send = sum(s.scheduled < flood_end for s in good) / FLOOD_S
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
        "goodput_by_send_of_capacity": round(by_send / capacity, 3),
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
    server: Process,
    path: str,
    batch_body: bytes | None = None,
    route: str | None = None,
    refusals: bool = False,
) -> dict[str, Any]:
    """``batch_body``: a request of a full batch's rows, whose time is "one batch" (else one
    request is); ``route``: the server's own for the path (a baseline's); ``refusals``: measure
    a refusal's CPU on its own too (``refusals_alone``: edgebento's).

    The server's CPU is read in both phases: ``refusals`` says what the flood's refusals cost
    it and how much goodput that CPU leaves (``refusal_cost``); ``goodput_per_cpu_of_capacity``
    is the goodput per CPU-second it was given, over capacity's (it does not move with the CPU
    the server gets: other work on its CPUs moves that)."""
    bodies, headers = _bodies(path, np.random.default_rng(0))
    url = server.url + (route if route is not None else URLS[path])
    if batch_body is None:
        one_batch = one_batch_s(url, bodies[0], headers)
    else:
        one_batch = one_batch_s(url, batch_body, headers, rounds=5)

    threads: list[tuple[thread_cpu.ThreadCpu, int]] = []  # each capacity phase's, and its 200s

    def capacity_phase() -> Capacity:
        """The closed loop's rate, and the server's CPU over the same window (from the first
        send to the last answer, not the generator's start and end around it: read so, a
        server never idle showed 1.03-1.05 CPUs busy on its one CPU)."""
        seen: dict[int, int] = {}
        edges: list[tuple[float, float, thread_cpu.ThreadCpu]] = []
        meter = CpuMeter(server.popen.pid)

        def edge() -> None:
            edges.append((time.perf_counter(), meter.read(), thread_cpu.read(server.popen.pid)))

        rate = run_loop(closed_loop(url, bodies, headers, CAPACITY_S, statuses=seen, on_edge=edge))
        (t0, cpu0, by_thread0), (t1, cpu1, by_thread1) = edges
        threads.append((by_thread1 - by_thread0, seen.get(200, 0)))
        return Capacity(rate, cpu1 - cpu0, seen.get(200, 0), t1 - t0)

    first = capacity_phase()
    before = first.rate
    # The generator's own lag (other work on its CPUs) is reported apart, and the slowest
    # answer is timed from the real send.
    phases = [(before * FACTOR, FLOOD_S), (before / 2, RECOVERY_S)]
    ERRORS.clear()
    load_before = load()
    meter = CpuMeter(server.popen.pid)
    marks: list[tuple[float, float]] = []  # (when, the server's CPU) as each phase begins
    flood_threads: list[thread_cpu.ThreadCpu] = []  # the same, by thread

    def mark(index: int) -> None:
        marks.append((time.perf_counter(), meter.read()))
        flood_threads.append(thread_cpu.read(server.popen.pid))

    shots, flood_cpu = measured(
        server.popen.pid, lambda: run_loop(open_loop(url, bodies, headers, phases, mark, WAIT_S))
    )
    # Capacity again after the flood: what the machine gives the server moves over seconds (other
    # work, the memory bus), so the flood is judged against the mean of the phases around it,
    # and how far they differ is reported (a server slower after a flood would show there). Not
    # for a server still working through the flood's queue (unanswered requests: a baseline's):
    # its capacity then is the backlog's, and it is judged against the capacity before.
    backlog = any(s.status == UNANSWERED for s in shots)
    second = first if backlog else capacity_phase()
    after = second.rate
    capacity = (before + after) / 2
    # The capacity phases' CPU per 200 and CPUs busy, over their windows together.
    phases_run = [first] if backlog else [first, second]
    capacity_cpu = sum(p.cpu for p in phases_run) / len(phases_run)
    per_ok = sum(p.cpu for p in phases_run) / max(sum(p.ok for p in phases_run), 1)
    busy_capacity = sum(p.cpu for p in phases_run) / sum(p.seconds for p in phases_run)
    flood_end = shots[0].scheduled + FLOOD_S if shots else 0.0
    verdict = judge(shots, capacity, flood_end, one_batch)
    verdict["offered_rps"] = round(before * FACTOR, 1)
    # Goodput per CPU-second the server spent during the flood, over the capacity phase's 200s
    # per CPU-second.
    window_cpu = marks[1][1] - marks[0][1] if len(marks) > 1 else 0.0
    per_cpu = (
        (verdict["goodput_rps"] * FLOOD_S / window_cpu) * per_ok if window_cpu and per_ok else None
    )
    by_thread = _by_thread(threads, flood_threads, shots, marks)
    cost = {
        **refusal_cost(shots, marks, per_ok, busy_capacity),
        **(refusals_alone(server, url, bodies, headers, per_ok) if refusals else {}),
    }
    cost.update(own_cpu_goodput(cost))
    return {
        **verdict,
        "capacity_before_rps": round(before, 1),
        "capacity_after_rps": None if backlog else round(after, 1),
        "capacity_after_over_before": None if backlog else round(after / max(before, 1e-9), 3),
        "server_cpu_s": {
            "capacity": round(capacity_cpu, 2),
            "flood": round(window_cpu, 2),
            "flood_recovery_and_drain": round(flood_cpu, 2),
        },
        "goodput_per_cpu_of_capacity": None if per_cpu is None else round(per_cpu, 3),
        "server_cpu_by_thread": by_thread,
        "refusal_cost": cost,
        "connection_errors": dict(ERRORS),
        "load_before": load_before,
    }


def _by_thread(
    capacity: list[tuple[thread_cpu.ThreadCpu, int]],
    flood: list[thread_cpu.ThreadCpu],
    shots: list[Shot],
    marks: list[tuple[float, float]],
) -> dict[str, float | None]:
    """The server's CPU per 200 by thread (``benchmarks/thread_cpu.py``): the capacity phases
    together, and the flood's window (from its first send to its last, answers counted when
    they came, as ``refusal_cost`` counts them)."""
    if len(flood) < 2 or len(marks) < 2:
        return {}
    used = sum((t for t, _ in capacity), thread_cpu.ThreadCpu(0.0, 0.0))
    ok = sum(n for _, n in capacity)
    (start, _), (end, _) = marks[0], marks[1]
    flood_ok = sum(s.status == 200 and start <= s.scheduled + s.latency < end for s in shots)
    return thread_cpu.per_answer(used, ok, flood[1] - flood[0], flood_ok)


REFUSALS_S = 2.0


def refusals_alone(
    server: Process,
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    per_ok: float,
) -> dict[str, Any]:
    """A refusal's CPU measured where refusals are nearly all the server does: 8 closed-loop
    clients keep the model's queue busy while 56 send requests whose own deadline (``x-timeout-ms``
    of 0.001) the queue cannot meet, refused before their body is read, as a flood's are. The
    server's CPU, less its 200s at capacity's cost each, over its 503s: the 200s are few, so
    an error in their cost moves this figure little (it moves the flood's own estimate more)."""
    doomed = {**headers, "x-timeout-ms": "0.001"}
    seen: dict[int, int] = {}

    async def both() -> None:
        await asyncio.gather(
            closed_loop(url, bodies, headers, REFUSALS_S, clients=8, statuses=seen),
            closed_loop(url, bodies, doomed, REFUSALS_S, clients=56, statuses=seen),
        )

    _, cpu = measured(server.popen.pid, lambda: run_loop(both()))
    ok, refused = seen.get(200, 0), seen.get(503, 0)
    out: dict[str, Any] = {"alone_answered": {str(k): v for k, v in sorted(seen.items())}}
    if refused:
        out["server_cpu_us_per_503_alone"] = round(1e6 * max(0.0, cpu - ok * per_ok) / refused, 1)
    return out


def refusal_cost(
    shots: list[Shot], marks: list[tuple[float, float]], per_ok: float, busy_capacity: float
) -> dict[str, Any]:
    """What the server's CPU went to during the flood (from its first send to its last,
    answers counted when they came): an accepted request costs what it cost at capacity, the
    refusals the rest.

    With ``x`` a refusal's cost over an accepted request's and ``b`` the server's CPU in the
    flood over capacity's, goodput is ``(b - FACTOR x) / (1 - x)`` of capacity (an identity of
    these figures: ``b`` is what other work on the machine moves, ``x`` what the server's code
    does). With the server's CPU its own in both phases (``b`` 1), 90% needs ``x`` at most
    ``0.1 / (FACTOR - 0.9)``: ``refusal_budget_for_90pct_us``; the goodput that ``x`` allows
    there is ``own_cpu_goodput``."""
    if len(marks) < 2:  # nothing was sent (no capacity): nothing to tell
        return {}
    (start, cpu_start), (end, cpu_end) = marks[0], marks[1]
    answered = [s for s in shots if start <= s.scheduled + s.latency < end]
    ok = sum(s.status == 200 for s in answered)
    refused = sum(s.status == 503 for s in answered)
    cpu = cpu_end - cpu_start
    busy = cpu / max(end - start, 1e-9)
    out: dict[str, Any] = {
        "server_cpu_busy_capacity": round(busy_capacity, 3),
        "server_cpu_busy_flood": round(busy, 3),
        "server_cpu_us_per_200": round(1e6 * per_ok, 1),
        "answered_in_flood": {"200": ok, "503": refused, "other": len(answered) - ok - refused},
        "refusal_budget_for_90pct_us": round(1e6 * per_ok * 0.1 / (FACTOR - 0.9), 1),
    }
    if not refused:
        return out
    per_refusal = max(0.0, cpu - ok * per_ok) / refused
    x = per_refusal / per_ok
    out.update(
        {
            "server_cpu_us_per_503": round(1e6 * per_refusal, 1),
            "refusal_over_200": round(x, 4),
            "flood_cpu_on_refusals": round(refused * per_refusal / max(cpu, 1e-9), 3),
        }
    )
    return out


def own_cpu_goodput(cost: dict[str, Any]) -> dict[str, Any]:
    """The goodput share of capacity that the refusals' cost allows a server whose CPU is its
    own in both phases (``b`` 1): ``(1 - FACTOR x) / (1 - x)``, ``x`` from the refusals
    measured alone where they were (fewer 200s to subtract), else from the flood's."""
    per_503 = cost.get("server_cpu_us_per_503_alone", cost.get("server_cpu_us_per_503"))
    per_200 = cost.get("server_cpu_us_per_200")
    if per_503 is None or not per_200:
        return {}
    x = per_503 / per_200
    return {"goodput_of_capacity_its_own_cpu_allows": round((1 - FACTOR * x) / (1 - x), 3)}


# The fixed-cost model of the targets: 32 3x3 Conv+Tanh of 32 channels on a 16x16 image, about
# 1.4 ms a request here, bound by compute. A MatMul chain of the same time at batch 1 (128 of
# 256x256, ``serving_models.slow``) streams 32 MB of weights from memory on every request: with a
# process copying memory on the generator's core, its cost rose by 40% (conv: 0-12%), and its
# capacity moved by up to a fifth between a flood's phases, more than what was measured. It is
# flooded in the first round still (``matmul-128``), beside the costlier convs.
MODEL = "conv-32"
CURVE = ("conv-64", "conv-128", "matmul-128")  # the same flood on other models (tensor JSON)
ROW_COST = "row-cost"  # batched: a cost that grows with the rows


def model_file(work: Path, model: str) -> Path:
    """The ONNX of ``model``: ``conv-N`` (N Conv+Tanh), ``matmul-N`` (N MatMul+Tanh of WIDTH)
    or ``row-cost``."""
    from tests.support import serving_models

    path = work / f"{model}.onnx"
    if path.exists():
        return path
    kind, _, depth = model.partition("-")
    if kind == "conv":
        return serving_models.conv_chain(path, width=WIDTH, depth=int(depth))
    if kind == "matmul":
        return serving_models.slow(path, width=WIDTH, depth=int(depth))
    return row_cost_model(path, WIDTH, ROW_COST_LAYERS)


_TAGS: dict[Path, str] = {}


def serve_slow(
    work: Path, key: Path, pub: Path, model: str, repo: Path = REPO, pinning: Pinning | None = None
) -> Process:
    """A fixed-cost ``model``, one request per batch; or the row-cost model, batched up to the
    service's default; one worker, one ORT thread, on ``pinning``'s server CPUs."""
    from modelpack import create_pack

    pack = work / f"pack-{model}"
    if not pack.exists():
        create_pack(model_file(work, model), pack, name="slow", version=1, key=key)
    home = work / f"bentoml-{model}"
    if home not in _TAGS:  # imported once; every tree serves it from the same store
        _TAGS[home] = import_to_store(pack, pub, home)
    tag = _TAGS[home]
    return start_bento(
        home,
        tag,
        work,
        repo,
        pinning,
        EDGEBENTO_WORKERS="1",
        EDGEBENTO_THREADS="1",
        EDGEBENTO_MAX_BATCH=str(MAX_BATCH_ROWS if model == ROW_COST else 1),
        EDGEBENTO_DEADLINE_S=str(DEADLINE_S),
    )


def flood_edgebento(
    work: Path,
    key: Path,
    pub: Path,
    model: str,
    paths: list[str],
    repo: Path,
    pinning: Pinning | None = None,
) -> dict[str, Any]:
    server = serve_slow(work, key, pub, model, repo, pinning)
    try:
        batch = full_batch_body(MAX_BATCH_ROWS) if model == ROW_COST else None
        return {
            path: run_path(server, path, batch, refusals=model == MODEL and path == "tensor_json")
            for path in paths
        }
    finally:
        server.stop()


BASELINE_ROUTES = {"plain_bentoml": "/predict", "bare_asgi": "/"}


def flood_baseline(work: Path, kind: str, pinning: Pinning | None = None) -> dict[str, Any]:
    """The tensor JSON flood on a baseline serving the fixed-cost model with one worker and one
    ONNX Runtime thread, as edgebento's service runs it here: the plain BentoML service
    (``plain_bentoml``) or the bare ASGI app (``bare_asgi``)."""
    start = start_plain_bento if kind == "plain_bentoml" else start_bare_asgi
    server = start(model_file(work, MODEL), work, 1, pinning)
    try:
        return run_path(server, "tensor_json", route=BASELINE_ROUTES[kind])
    finally:
        server.stop()
