"""``InferenceMetrics.ok`` on an event loop: the answer is counted at once, and the latencies
of one turn are written in one go at the loop's next turn, each in the bucket and the sum that
``observe`` one by one would give it. Outside a loop, both at once."""

from __future__ import annotations

import asyncio
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from modelpack.metrics import LATENCY_BUCKETS, InferenceMetrics


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _buckets(registry: CollectorRegistry) -> list[float]:
    return [
        _sample(registry, "edgebento_inference_seconds_bucket", {"le": str(float(b))})
        for b in (*LATENCY_BUCKETS, math.inf)
    ]


latencies = st.lists(
    st.floats(0, 10, allow_nan=False) | st.sampled_from(LATENCY_BUCKETS), min_size=1, max_size=40
)


@settings(max_examples=40, deadline=None)
@given(latencies)
def test_a_turns_latencies_are_written_at_the_next_turn_as_observe_writes_them(
    seconds: list[float],
) -> None:
    one_by_one, turned = CollectorRegistry(), CollectorRegistry()
    alone, metrics = InferenceMetrics(registry=one_by_one), InferenceMetrics(registry=turned)
    for value in seconds:
        alone.ok(value)  # no loop runs here: written at once
    ok = {"outcome": "ok"}

    async def answer_all() -> None:
        for value in seconds:
            metrics.ok(value)
        # Counted before the answers leave; their latencies not yet written.
        assert _sample(turned, "edgebento_requests_total", ok) == len(seconds)
        assert _sample(turned, "edgebento_inference_seconds_count") == 0
        await asyncio.sleep(0)  # the loop's next turn
        assert _sample(turned, "edgebento_inference_seconds_count") == len(seconds)

    asyncio.run(answer_all())
    assert _buckets(turned) == _buckets(one_by_one)
    assert math.isclose(
        _sample(turned, "edgebento_inference_seconds_sum"),
        _sample(one_by_one, "edgebento_inference_seconds_sum"),
        rel_tol=1e-9,
        abs_tol=1e-12,
    )
    assert _sample(one_by_one, "edgebento_requests_total", ok) == len(seconds)
    assert not metrics._latencies  # nothing left behind for a loop that is gone


def test_latencies_of_a_loop_that_ends_right_after_are_written() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry=registry)

    async def last_answer() -> None:
        metrics.ok(0.003)

    asyncio.run(last_answer())
    assert _sample(registry, "edgebento_inference_seconds_count") == 1
    assert _sample(registry, "edgebento_inference_seconds_bucket", {"le": "0.005"}) == 1
