"""A place held in the queue for a request admitted from its headers (``Reservation``) counts as
queued until it is released, once, whatever the order of releases."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.serving.batching import Batcher
from modelpack.serving.reservation import Reservation


def _batcher(max_queue: int) -> Batcher:
    return Batcher(lambda feed: feed, max_queue=max_queue)


def test_a_held_place_counts_as_queued_until_released_once() -> None:
    batcher = _batcher(max_queue=2)
    first, second = batcher.reserve(), batcher.reserve()
    assert batcher.full()
    first.release()
    first.release()  # the app and the connection may both release it: once counts
    assert batcher.reserved == 1 and not batcher.full()
    second.release()
    assert batcher.reserved == 0


def test_a_held_place_is_work_ahead_of_the_next_request() -> None:
    """Held places are counted as a row each in the wait ahead: a request whose deadline
    leaves no room for them is refused from its headers too."""
    batcher = _batcher(max_queue=256)
    batcher.per_row_s = 0.1
    deadline = time.monotonic() + 0.25
    assert not batcher.would_miss(deadline)  # nothing ahead: an idle model takes anything
    held = [batcher.reserve() for _ in range(3)]
    assert batcher.expected_wait() >= 0.3
    assert batcher.would_miss(deadline)
    for hold in held:
        hold.release()
    assert not batcher.would_miss(deadline)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(st.tuples(st.sampled_from(["reserve", "release"]), st.integers(0, 7)), max_size=40),
)
def test_held_places_are_what_was_reserved_and_not_yet_released(
    max_queue: int, steps: list[tuple[str, int]]
) -> None:
    batcher = _batcher(max_queue)
    holds: list[Reservation] = []
    live: set[int] = set()
    for op, index in steps:
        if op == "reserve":
            holds.append(batcher.reserve())
            live.add(len(holds) - 1)
        elif holds:
            pick = index % len(holds)
            holds[pick].release()  # a second release of the same hold changes nothing
            live.discard(pick)
        assert batcher.reserved == len(live)
        assert batcher.full() == (len(live) >= max_queue)
    for hold in holds:
        hold.release()
    assert batcher.reserved == 0
    assert batcher.expected_wait() == 0.0
