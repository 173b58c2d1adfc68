"""The overload benchmark's verdict (``benchmarks/overload_flood.py``) counts goodput as the good
answers that came during the flood, per second of it: the queue a server keeps at the flood's end
(a deadline's worth of accepted work) is answered after the flood and is not the flood's rate.
Counted by send, a 6 s flood with a 2 s queue read as a third more goodput than the server gave.
And ``refusal_cost`` splits the server's CPU in the flood into its 200s (at capacity's cost
each) and its refusals."""

from __future__ import annotations

import pytest

from benchmarks.open_loop import Shot
from benchmarks.overload_flood import (
    CAPACITY_S,
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
    cost = refusal_cost(shots, marks, capacity, capacity * CAPACITY_S * per_200)
    assert cost["server_cpu_us_per_200"] == pytest.approx(1e6 * per_200)
    assert cost["server_cpu_us_per_503"] == pytest.approx(1e6 * per_503, rel=0.01)
    x = per_503 / per_200
    assert own_cpu_goodput(cost)["goodput_of_capacity_its_own_cpu_allows"] == pytest.approx(
        (1 - FACTOR * x) / (1 - x), abs=0.002
    )
    # 90% of capacity on the server's own CPU needs a refusal at most 0.1 / (FACTOR - 0.9) of a 200.
    assert cost["refusal_budget_for_90pct_us"] == pytest.approx(1e6 * per_200 * 0.1 / 3.1, abs=0.1)
