"""Deadlines as the client sees them (issue 18, finding 12): the queue's arithmetic plans for
the rows ahead at the measured cost per row, and a batch shrinks to what its deadlines allow.
The time figures themselves are the overload benchmark's (benchmarks/bench_serving_overload.py):
these tests check the decisions, with the model's cost given, not measured."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bentos.loop_lag import LoopLag
from modelpack.serving.batching import Batcher, _Pending
from modelpack.serving.run_cost import RunCost
from modelpack.serving.stacking import shape_key

X = {"x": np.zeros((1, 4), np.float32)}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _row_cost_batcher(per_row_s: float = 0.1) -> Batcher:
    """A batcher whose model costs ``per_row_s`` a row (as measured from two runs)."""
    batcher = Batcher(lambda feed: feed, max_rows=64)
    batcher.cost.observe(1, per_row_s)
    batcher.cost.observe(11, 11 * per_row_s)
    return batcher


def _queue(
    batcher: Batcher, loop: asyncio.AbstractEventLoop, deadlines: list[float]
) -> list[_Pending]:
    now = time.monotonic()
    items = []
    for deadline in deadlines:
        item = _Pending(X, 1, shape_key(X, None), now + deadline, now, loop.create_future())
        batcher._queue.append(item)
        batcher._queued_rows += 1
        items.append(item)
    return items


@given(
    fixed=st.floats(0, 0.5),
    per_row=st.floats(0.0001, 0.1),
    sizes=st.lists(st.integers(1, 64), min_size=2, max_size=30),
)
def test_the_cost_of_a_run_is_fitted_from_the_runs_seen(
    fixed: float, per_row: float, sizes: list[int]
) -> None:
    cost = RunCost()
    for rows in sizes:
        cost.observe(rows, fixed + rows * per_row)

    def true(rows: int) -> float:
        return fixed + rows * per_row

    if cost.fitted:  # sizes apart enough to tell the slope: the line itself
        for rows in (1, 17, 64):
            assert cost.estimate(rows) == pytest.approx(true(rows), rel=0.05, abs=1e-4)
    else:  # sizes too alike to tell a slope: all charged per row, never less for as many rows
        assert cost.fixed_s == 0
        for rows in (max(sizes), 64):
            assert cost.estimate(rows) >= true(rows) * (1 - 1e-9)


def test_a_batch_shrinks_to_the_rows_that_end_by_its_deadlines(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher = _row_cost_batcher(0.1)
    _queue(batcher, loop, [1.05] * 20)  # 20 rows of 0.1 s, each to end within 1.05 s
    taken = batcher._take()
    assert taken is not None
    batch, expired = taken
    assert len(batch) == 10 and not expired  # 10 rows end at 1.0 s; 11 would end at 1.1 s
    assert batcher.depth == 10 and batcher._queued_rows == 10


def test_a_head_past_saving_still_starts_but_does_not_shrink_the_batch_further(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher = _row_cost_batcher(0.1)
    _queue(batcher, loop, [0.05, *[0.55] * 10])
    batch, _ = batcher._take() or ([], [])
    # The head cannot end by its own deadline alone (0.1 s > 0.05 s): it runs anyway (its
    # answer ends within one run of its deadline), with 4 more rows that end by 0.55 s.
    assert len(batch) == 5


def test_without_a_measured_cost_a_batch_takes_up_to_its_rows(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher = Batcher(lambda feed: feed, max_rows=8)
    _queue(batcher, loop, [1.0] * 20)
    batch, _ = batcher._take() or ([], [])
    assert len(batch) == 8


def test_admission_counts_the_rows_ahead_and_the_requests_own_run() -> None:
    batcher = _row_cost_batcher(0.1)
    now = time.monotonic()
    assert not batcher.would_miss(now + 0.01)  # nothing ahead: any request may try
    batcher.per_row_s = 0.1  # the queue drains a row every 0.1 s
    batcher._queue.append(object())  # type: ignore[arg-type]
    batcher._queued_rows = 10  # 1 s of work ahead
    now = time.monotonic()
    assert batcher.would_miss(now + 1.05)  # starts at 1 s, its own row ends at 1.1 s
    assert not batcher.would_miss(now + 1.5)
    assert batcher.would_miss(now + 1.5, rows=8)  # 8 rows of its own end at 1.8 s
    batcher._busy_until = time.monotonic() + 0.5  # and a batch still running for 0.5 s
    assert batcher.would_miss(time.monotonic() + 1.5)


def test_the_loop_lag_is_the_time_the_loop_was_busy() -> None:
    async def main() -> tuple[float, float]:
        lag = LoopLag()
        idle = lag.behind()
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # the loop is busy (a request waiting in its socket meanwhile)
        for _ in range(2):  # the overdue timer runs in the next turn, after this task's step
            await asyncio.sleep(0)
        return idle, lag.behind()

    idle, busy = asyncio.run(main())
    assert idle == 0.0 and busy >= 0.15
