"""``edge_agent.packet_limit``: which message an unexplained close is blamed on, when that is a
verdict, and the bound learned; and the longest batch that fits (the whole agent is tested on
Mosquitto in tests/integration/test_agent_packet_limit.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.packet_limit import MIN_SUSPECT, SOON_S, PacketLimitWatch, Unacked, longest_fitting
from edge_agent.reconnect import CONNECTION_LOST, TakeoverWatch


def _sent(mid: int, size: int, at: float = 0.0) -> Unacked:
    return Unacked(mid, f"replies/{mid}", size, at)


def test_the_same_message_unacknowledged_at_two_closes_in_a_row_is_over_the_limit() -> None:
    watch = PacketLimitWatch()
    watch.acked(3000)
    first = watch.closed(0.1, [_sent(7, 20_000), _sent(8, 2000)])
    assert first is not None and first.message.mid == 7 and first.bound is None
    # paho sent it again at the reconnect (same mid), and the broker closed again.
    second = watch.closed(1.0, [_sent(7, 20_000, 0.9), _sent(8, 2000, 0.9)])
    assert second is not None and second.message.mid == 7 and second.bound == 19_999
    assert watch.bound == 19_999


def test_no_message_is_blamed_that_the_broker_could_have_taken() -> None:
    """Not larger than a packet the broker acknowledged, not over the floor, or sent long before
    the close: not the cause (a broker that restarts, a network fault)."""
    watch = PacketLimitWatch()
    watch.acked(20_000)
    for _ in range(3):
        assert watch.closed(1.0, [_sent(1, 20_000, 0.9), _sent(2, 800, 0.9)]) is None
    fresh = PacketLimitWatch()
    for _ in range(3):
        assert fresh.closed(1.0, [_sent(2, MIN_SUSPECT, 0.9)]) is None
        assert fresh.closed(100.0, [_sent(3, 50_000, 100.0 - SOON_S - 1)]) is None
    assert watch.bound is None and fresh.bound is None


def test_a_close_between_that_blames_none_or_another_breaks_the_row() -> None:
    watch = PacketLimitWatch()
    assert watch.closed(0.0, [_sent(1, 9000)]) is not None
    watch.explained()  # a keepalive timeout, our own disconnect, a failed connect
    assert watch.closed(1.0, [_sent(1, 9000, 1.0)]).bound is None  # type: ignore[union-attr]
    assert watch.closed(2.0, [_sent(2, 9500, 2.0)]).bound is None  # type: ignore[union-attr]
    assert watch.closed(3.0, []) is None
    assert watch.closed(4.0, [_sent(2, 9500, 4.0)]).bound is None  # type: ignore[union-attr]
    assert watch.bound is None


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(MIN_SUSPECT, 40_000),
    sizes=st.lists(st.integers(100, 60_000), min_size=1, max_size=12),
)
def test_against_a_broker_that_drops_whoever_sends_over_its_limit(
    limit: int, sizes: list[int]
) -> None:
    """A broker that acknowledges in order and closes the connection at the first packet over
    ``limit``, a client that sends everything unacknowledged again at each reconnect: every
    message the broker takes is delivered, every one over is removed after two closes, and the
    bound learned is never below the broker's limit (nothing it takes is ever refused)."""
    watch = PacketLimitWatch()
    queue = [_sent(mid, size) for mid, size in enumerate(sizes)]
    delivered: list[int] = []
    closes, now = 0, 0.0
    while queue:
        now += 1.0
        queue = [Unacked(u.mid, u.topic, u.size, now) for u in queue]  # sent again
        over = next((i for i, u in enumerate(queue) if u.size > limit), None)
        for u in queue[:over]:
            watch.acked(u.size)
            delivered.append(u.mid)
        if over is None:
            break
        queue, closes = queue[over:], closes + 1
        blame = watch.closed(now + 0.01, queue)
        if blame is not None and blame.bound is not None:
            queue = [u for u in queue if u.size <= blame.bound]
        assert closes <= 2 * len(sizes), "a message kept the device off the broker"
    assert delivered == [mid for mid, size in enumerate(sizes) if size <= limit]
    assert watch.bound is None or watch.bound >= limit
    if any(size > limit for size in sizes):
        assert watch.bound is not None


@given(count=st.integers(0, 300), fitting=st.integers(0, 400))
def test_longest_fitting_is_the_largest_count_that_fits(count: int, fitting: int) -> None:
    asked: list[int] = []

    def fits(n: int) -> bool:
        asked.append(n)
        return n <= fitting

    assert longest_fitting(count, fits) == min(count, fitting)
    assert len(asked) <= 1 + count.bit_length()  # the whole batch, then by halves


def test_a_close_blamed_on_a_message_is_no_takeover() -> None:
    """The session tells the takeover watch that such a close is explained: two drops for one
    message are not two takeovers."""
    watch = TakeoverWatch("edge-agent-cam-1")
    for at in (0.0, 0.5, 1.0):
        watch.accepted(at)
        watch.explained()
    watch.accepted(1.5)
    assert watch.lost(1.6, CONNECTION_LOST, from_broker=False) is None
    assert watch.taken_over == 0
