"""The overload benchmark's verdict (``benchmarks/overload_flood.py``) counts goodput as the good
answers that came during the flood, per second of it: the queue a server keeps at the flood's end
(a deadline's worth of accepted work) is answered after the flood and is not the flood's rate.
Counted by send, a 6 s flood with a 2 s queue read as a third more goodput than the server gave.
And ``refusal_cost`` splits the server's CPU in the flood into its 200s (at capacity's cost
each) and its refusals; the capacity it is judged against is read over the window its rate is
over (``closed_loop``'s edges)."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.open_loop import Shot, closed_loop
from benchmarks.overload_flood import (
    FACTOR,
    FLOOD_S,
    judge,
    own_cpu_goodput,
    refusal_cost,
)


def _flood(capacity: float, queue_s: float) -> list[Shot]:
    """A server that answers ``capacity`` 200s a second, each ``queue_s`` after its send, and
    refuses the rest of a flood at FACTOR times that at once; it goes on answering the last
    ``queue_s`` of accepted requests after the flood."""
    shots, sent = [], FACTOR * capacity
    for i in range(int(sent * FLOOD_S)):
        t = i / sent
        if i % int(FACTOR) == 0:
            shots.append(Shot(t, queue_s, 200, queue_s))
        else:
            shots.append(Shot(t, 0.001, 503, 0.001))
    for i in range(int(capacity / 2 * 2)):  # the recovery, at half the capacity
        t = FLOOD_S + i / (capacity / 2)
        shots.append(Shot(t, 0.01, 200, 0.01))
    return shots


def test_goodput_is_the_rate_of_good_answers_during_the_flood_not_the_drain_after_it() -> None:
    capacity = 100.0
    verdict = judge(_flood(capacity, queue_s=1.9), capacity, FLOOD_S, one_batch=0.05)
    # 200s sent in the flood's last 1.9 s come after it: they are not its rate.
    assert verdict["goodput_of_capacity"] == pytest.approx((FLOOD_S - 1.9) / FLOOD_S, abs=0.01)
    assert verdict["goodput_by_send_of_capacity"] == pytest.approx(1.0, abs=0.01)


def test_refusal_cost_splits_the_floods_cpu_between_200s_and_refusals() -> None:
    capacity, per_200, per_503 = 100.0, 0.01, 0.0002
    shots = _flood(capacity, queue_s=0.0)
    ok = sum(s.status == 200 for s in shots if s.scheduled < FLOOD_S)
    refused = sum(s.status == 503 for s in shots)
    marks = [(0.0, 50.0), (FLOOD_S, 50.0 + ok * per_200 + refused * per_503)]
    cost = refusal_cost(shots, marks, per_200, busy_capacity=capacity * per_200)
    assert cost["server_cpu_us_per_200"] == pytest.approx(1e6 * per_200)
    assert cost["server_cpu_us_per_503"] == pytest.approx(1e6 * per_503, rel=0.01)
    x = per_503 / per_200
    assert own_cpu_goodput(cost)["goodput_of_capacity_its_own_cpu_allows"] == pytest.approx(
        (1 - FACTOR * x) / (1 - x), abs=0.002
    )
    # 90% of capacity on the server's own CPU needs a refusal at most 0.1 / (FACTOR - 0.9) of a 200.
    assert cost["refusal_budget_for_90pct_us"] == pytest.approx(1e6 * per_200 * 0.1 / 3.1, abs=0.1)


def test_the_capacity_rate_is_over_the_window_between_its_edges() -> None:
    """The server's CPU in a capacity phase is read at ``closed_loop``'s edges: its 200s over
    the time between them are its rate (the CPU had been read around the generator's whole
    run, a window longer than the rate's, and divided by the nominal 3 s: 1.03-1.05 CPUs
    busy for a server on one CPU)."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(answer)

    async def measure() -> tuple[float, list[float], dict[int, int]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        edges: list[float] = []
        seen: dict[int, int] = {}
        async with server:
            rate = await closed_loop(
                f"http://127.0.0.1:{port}/",
                [b"{}"],
                {},
                0.2,
                clients=4,
                statuses=seen,
                on_edge=lambda: edges.append(time.perf_counter()),
            )
        return rate, edges, seen

    rate, edges, seen = asyncio.run(measure())
    assert len(edges) == 2 and seen[200] > 0
    assert rate == pytest.approx(seen[200] / (edges[1] - edges[0]), rel=0.01)
