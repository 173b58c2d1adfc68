"""How long a clean stop waits for telemetry acknowledgements, and the round trips it is read from
(the agent's stop through a real broker: tests/integration/test_stop_without_ingestion.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.telemetry_acks import (
    ACKED_FLOOR_S,
    NO_ACK_GRACE_S,
    RTT_FACTOR,
    AckClock,
    stop_patience,
)

rtts = st.floats(min_value=0.0, max_value=3600.0, allow_nan=False)
limits = st.floats(min_value=0.0, max_value=60.0, allow_nan=False)


@given(limits)
def test_with_no_acknowledgement_ever_a_stop_waits_one_short_grace(flush_s: float) -> None:
    assert stop_patience(None, flush_s) == min(flush_s, NO_ACK_GRACE_S)


@given(rtts, rtts, limits)
def test_with_acknowledgements_it_waits_a_multiple_of_the_round_trip_within_flush_s(
    a: float, b: float, flush_s: float
) -> None:
    low, high = sorted((a, b))
    patience = stop_patience(low, flush_s)
    assert patience <= flush_s  # flush_s stays the upper bound
    assert patience >= min(flush_s, ACKED_FLOOR_S, RTT_FACTOR * low)
    assert patience >= min(flush_s, NO_ACK_GRACE_S)  # never shorter than with no ingestion
    assert stop_patience(high, flush_s) >= patience  # a slower ingestion is waited for longer
    if ACKED_FLOOR_S <= RTT_FACTOR * low <= flush_s:
        assert patience == RTT_FACTOR * low


def test_the_round_trip_runs_from_the_oldest_batch_an_ack_covers() -> None:
    clock = AckClock()
    clock.sent("boot-a", 49, at=10.0)
    clock.sent("boot-a", 99, at=10.5)
    clock.sent("boot-a", 149, at=11.0)
    clock.acked({"boot-b": 500}, deleted=0, now=11.2)  # another boot's: covers none of them
    assert clock.worst() is None and clock.progress_at is None
    clock.acked({"boot-a": 99}, deleted=100, now=11.2)  # the first two, one flush
    assert clock.worst() == 11.2 - 10.0
    assert clock.progress_at == 11.2
    clock.acked({"boot-a": 149}, deleted=50, now=11.3)
    assert clock.worst() == 11.2 - 10.0  # the slowest recent one
    clock.acked({"boot-a": 149}, deleted=0, now=12.0)  # again: nothing covered, no progress
    assert clock.progress_at == 11.3


def test_a_rewind_times_what_is_sent_again_from_its_new_send() -> None:
    clock = AckClock()
    clock.sent("boot-a", 9, at=0.0)  # lost with the broker
    clock.forget()
    clock.sent("boot-a", 9, at=30.0)
    clock.acked({"boot-a": 9}, deleted=10, now=30.4)
    assert clock.worst() == 30.4 - 30.0


def test_only_the_recent_round_trips_count() -> None:
    clock = AckClock(keep=4)
    clock.sent("boot-a", 0, at=0.0)
    clock.acked({"boot-a": 0}, deleted=1, now=5.0)  # a slow one, long ago
    for seq in range(1, 5):
        clock.sent("boot-a", seq, at=float(seq * 10))
        clock.acked({"boot-a": seq}, deleted=1, now=seq * 10 + 0.25)
    assert clock.worst() == 0.25
