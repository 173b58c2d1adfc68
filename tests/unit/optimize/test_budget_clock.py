"""The time budget's clock: estimates per kind from the first candidates, what still fits, and
the time left as the progress bar says it. No sleeps: a clock that started earlier stands in
for time spent."""

from __future__ import annotations

import math
import time

from hypothesis import given
from hypothesis import strategies as st

from optimize.budget import Clock, left_text, seconds_text


def test_a_kind_is_estimated_from_its_own_first_candidates() -> None:
    clock = Clock(600)
    assert clock.estimate("static") is None and clock.left(["static"], 30) is None
    clock.record("base", 1.0)
    assert clock.estimate("static") == 1.0  # none of its kind yet: every candidate so far
    clock.record("static", 40.0)
    clock.record("static", 60.0)
    clock.record("dynamic", 2.0)
    assert clock.estimate("static") == 50.0 and clock.estimate("dynamic") == 2.0


def test_a_candidate_that_would_end_past_the_budget_is_not_started_but_a_cheap_one_is() -> None:
    clock = Clock(100, start=time.monotonic() - 80)  # 20 s left
    clock.record("static", 45.0)
    clock.record("dynamic", 3.0)
    assert not clock.spent()
    assert not clock.fits("static") and clock.fits("dynamic")
    spent = Clock(100, start=time.monotonic() - 101)
    assert spent.spent() and not spent.fits("dynamic")


def test_no_limit() -> None:
    clock = Clock(0, start=time.monotonic() - 1e6)
    clock.record("static", 1e5)
    assert clock.deadline == math.inf and clock.fits("static") and not clock.spent()
    assert seconds_text(math.inf) == "no limit"


@given(
    budget=st.floats(1, 3600),
    spent=st.floats(0, 3600),
    costs=st.lists(st.floats(0.01, 600), min_size=1, max_size=5),
    left=st.integers(0, 20),
    tail=st.floats(0, 60),
)
def test_the_time_left_never_runs_past_the_budget(
    budget: float, spent: float, costs: list[float], left: int, tail: float
) -> None:
    clock = Clock(budget, start=time.monotonic() - spent)
    for cost in costs:
        clock.record("static", cost)
    found = clock.left(["static"] * left, tail)
    assert found is not None
    assert tail <= found <= max(0.0, budget - spent) + tail + 1e-6
    assert found <= sum(costs) / len(costs) * left + tail + 1e-6


def test_the_progress_text() -> None:
    assert left_text(None) == "estimating time left"
    assert left_text(12) == "under 1 min left"
    assert left_text(61) == "about 2 min left"
    assert seconds_text(600) == "10 min" and seconds_text(0.001) == "0.001 s"
