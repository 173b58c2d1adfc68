"""``InferenceMetrics.overloaded`` on an event loop: the refusals of one turn are written in one
go per reason at the loop's next turn, the same totals as counting them one by one, before
anything the loop reads afterwards runs. Outside a loop, at once."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from modelpack.metrics import InferenceMetrics

REASONS = ("queue_full", "deadline", "model_busy")


def _counts(registry: CollectorRegistry) -> dict[str, float]:
    found = {
        reason: registry.get_sample_value("edgebento_overload_rejected_total", {"reason": reason})
        or 0.0
        for reason in REASONS
    }
    found["overloaded"] = (
        registry.get_sample_value("edgebento_requests_total", {"outcome": "overloaded"}) or 0.0
    )
    return found


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(REASONS), max_size=30), min_size=1, max_size=5))
def test_a_turns_refusals_are_written_at_the_next_turn_as_counting_one_by_one_would(
    turns: list[list[str]],
) -> None:
    one_by_one, turned = CollectorRegistry(), CollectorRegistry()
    alone, metrics = InferenceMetrics(registry=one_by_one), InferenceMetrics(registry=turned)
    for turn in turns:
        for reason in turn:
            alone.overloaded(reason)  # no loop runs here: written at once

    async def refuse_all() -> None:
        written = 0
        for turn in turns:
            for reason in turn:
                metrics.overloaded(reason)
            assert _counts(turned)["overloaded"] == written  # this turn's: not yet
            await asyncio.sleep(0)  # the loop's next turn: written before this runs on
            written += len(turn)
            assert _counts(turned)["overloaded"] == written

    asyncio.run(refuse_all())
    assert _counts(turned) == _counts(one_by_one)
    assert _counts(one_by_one)["overloaded"] == sum(len(t) for t in turns)
    assert not metrics._refusals  # nothing left behind for a loop that is gone


def test_refusals_of_a_loop_that_ends_right_after_are_written() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry=registry)

    async def last_refusal() -> None:
        metrics.overloaded("queue_full")

    asyncio.run(last_refusal())
    assert _counts(registry)["queue_full"] == 1 and _counts(registry)["overloaded"] == 1


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.sampled_from(REASONS), max_size=20), min_size=1, max_size=4))
def test_refusals_written_every_so_often_are_written_before_a_scrape_or_when_due(
    turns: list[list[str]],
) -> None:
    """BentoML's service: a worker's refusals are written ``every`` after the first not yet
    written, or sooner by ``write_pending`` (before a scrape it serves, when it stops), with
    the same totals as counting them one by one."""
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry=registry)
    every = 0.02
    metrics.write_refusals_every(every)

    async def refuse_all() -> None:
        loop = asyncio.get_running_loop()
        written = 0
        for index, turn in enumerate(turns):
            for reason in turn:
                metrics.overloaded(reason)
            await asyncio.sleep(0)  # the next turn: not written yet
            assert _counts(registry)["overloaded"] == written
            if index % 2:
                metrics.write_pending()  # a scrape
            else:
                due = asyncio.Event()  # a timer due after the write's: it runs after it
                loop.call_later(2 * every, due.set)
                await due.wait()
            written += len(turn)
            assert _counts(registry)["overloaded"] == written

    asyncio.run(refuse_all())
    one_by_one = CollectorRegistry()
    alone = InferenceMetrics(registry=one_by_one)
    for turn in turns:
        for reason in turn:
            alone.overloaded(reason)
    assert _counts(registry) == _counts(one_by_one)
