"""``FeedChecks`` (``check_feed`` remembered per feed pattern) decides every feed exactly as
``check_feed`` does: the same row count or the same refusal, whatever came before it, across
two limits and a memory that fills and starts over."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.errors import InputError
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import ServingLimits
from modelpack.serving.tensors import FeedChecks, check_feed

# Two batch-major inputs sharing a symbol, a fixed dim and a dim of their own.
SPECS = {
    "a": TensorSpec(name="a", dtype="float32", shape=["batch", 2, "seq"]),
    "b": TensorSpec(name="b", dtype="int64", shape=["n", "seq"]),
}
LIMITS = (ServingLimits(max_rows=3), ServingLimits(max_rows=2, max_input_bytes=96))
dims = st.integers(0, 4)
arrays = st.tuples(
    st.lists(dims, min_size=1, max_size=4).map(tuple),
    st.sampled_from([np.float32, np.int64, np.uint8]),
).map(lambda spec: np.zeros(spec[0], spec[1]))
feeds = st.dictionaries(st.sampled_from(["a", "b", "c"]), arrays, max_size=3)


def outcome(check: object, *args: object) -> tuple[str, object]:
    try:
        return "rows", check(*args)  # type: ignore[operator]
    except InputError as exc:
        return exc.reason, str(exc)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(feeds, st.sampled_from(LIMITS)), min_size=1, max_size=12),
    st.integers(1, 4),
)
def test_every_feed_is_decided_as_check_feed_decides_it(
    calls: list[tuple[dict[str, np.ndarray], ServingLimits]], keep: int
) -> None:
    checks = FeedChecks(SPECS, keep=keep)
    for feed, limits in calls + calls:  # every pattern again, remembered or not
        assert outcome(checks.rows, feed, limits) == outcome(check_feed, SPECS, feed, limits)


def test_a_pattern_that_passed_is_remembered_and_the_memory_stays_bounded() -> None:
    checks = FeedChecks(SPECS, keep=2)
    limits = LIMITS[0]
    one = {"a": np.zeros((1, 2, 3), np.float32), "b": np.zeros((1, 3), np.int64)}
    assert checks.rows(one, limits) == 1
    assert len(checks._passed) == 1
    for rows in (2, 3):
        feed = {"a": np.zeros((rows, 2, 3), np.float32), "b": np.zeros((rows, 3), np.int64)}
        assert checks.rows(feed, limits) == rows
    assert len(checks._passed) <= 2
    # A refusal is never remembered, and other limits decide again.
    four = {"a": np.zeros((4, 2, 3), np.float32), "b": np.zeros((4, 3), np.int64)}
    assert outcome(checks.rows, four, limits)[0] == "batch_too_large"
    assert outcome(checks.rows, one, LIMITS[1]) == ("rows", 1)
    three = {"a": np.zeros((3, 2, 3), np.float32), "b": np.zeros((3, 3), np.int64)}
    assert outcome(checks.rows, three, LIMITS[1])[0] == "too_large"
