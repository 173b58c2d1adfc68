"""``edge_agent.packet_limit``: which message an unexplained close is blamed on, when that is a
verdict, and the bound learned; how a close counts for the takeover watch; and the longest batch
that fits (the whole agent is tested on Mosquitto in tests/integration/test_agent_packet_limit.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import AgentConfig
from edge_agent.packet_evidence import (
    CLOSES,
    EXACT_VERDICTS,
    LAPSE_S,
    MIN_SUSPECT,
    SOON_S,
    PacketLimitWatch,
    Unacked,
)
from edge_agent.packet_limit import longest_fitting
from edge_agent.reconnect import CONNECTION_LOST, TakeoverWatch
from edge_agent.session import Session


def _sent(mid: int, size: int, at: float = 0.0) -> Unacked:
    return Unacked(mid, f"replies/{mid}", size, at)


def test_the_same_message_unacknowledged_at_three_closes_in_a_row_is_over_the_limit() -> None:
    watch = PacketLimitWatch()
    watch.acked(3000)
    first = watch.closed(0.1, [_sent(7, 20_000), _sent(8, 2000)])
    assert first is not None and first.message.mid == 7 and first.bound is None
    # paho sent it again at each reconnect (same mid), and the broker closed at once each time.
    second = watch.closed(1.0, [_sent(7, 20_000, 0.9), _sent(8, 2000, 0.9)])
    assert second is not None and second.closes == 2 and second.bound is None
    third = watch.closed(2.0, [_sent(7, 20_000, 1.9), _sent(8, 2000, 1.9)])
    assert third is not None and third.message.mid == 7 and third.bound == 19_999
    assert watch.bound == 19_999 and CLOSES == 3


def test_an_mqtt5_broker_that_says_packet_too_large_is_believed_at_once() -> None:
    watch = PacketLimitWatch()
    blame = watch.closed(0.1, [_sent(7, 20_000), _sent(8, 2000)], told=True)
    assert blame is not None and blame.message.mid == 7 and blame.bound == 19_999


def test_a_close_long_after_the_resend_or_the_suspect_acknowledged_breaks_the_row() -> None:
    """A real oversized packet is read, and the connection closed, right after paho sends it
    again at the CONNACK; a link that drops later, or a broker that acknowledged the suspect, is
    no evidence against it."""
    watch = PacketLimitWatch()
    for start in (0.0, 10.0):
        assert watch.closed(start + 0.1, [_sent(7, 20_000, start)]) is not None
        assert watch.closed(start + 1.0 + SOON_S + 0.1, [_sent(7, 20_000, start + 1.0)]) is None
    again = watch.closed(20.1, [_sent(7, 20_000, 20.0)])
    assert again is not None and again.closes == 1  # the row starts again
    watch.acked(20_000, suspect=True)
    watch.connected(29.0)
    again = watch.closed(30.1, [_sent(7, 20_000, 30.0)])
    assert again is not None and again.closes == 1
    assert watch.bound is None


def test_an_acknowledgement_on_an_earlier_connection_says_nothing_of_this_one() -> None:
    """A broker restarted with a lower max_packet_size, or a fail-over: what the old one took
    no longer hides a message over the new limit."""
    watch = PacketLimitWatch()
    watch.acked(30_000)
    watch.connected(1.0)
    for at in (1.0, 2.0, 3.0):
        blame = watch.closed(at + 0.05, [_sent(4, 20_000, at)])
    assert blame is not None and blame.bound == 19_999


def test_a_learned_bound_lapses_at_the_first_connect_an_hour_later() -> None:
    """Provisional: a bound that was false (a flaky link) or a limit raised since is not kept
    for the whole run; if still true, three drops teach it again."""
    watch = PacketLimitWatch()
    for at in (1.0, 2.0, 3.0):
        watch.connected(at)
        blame = watch.closed(at + 0.05, [_sent(4, 20_000, at)])
    assert blame is not None and watch.bound == 19_999
    watch.connected(3.0 + LAPSE_S / 2)
    assert watch.bound == 19_999
    watch.connected(3.05 + LAPSE_S)
    assert watch.bound is None and watch.verdicts == 0


def test_a_client_stepping_the_bound_down_gets_few_steps() -> None:
    """Answers asked just under each bound in turn: after EXACT_VERDICTS verdicts, each takes
    an eighth off the bound (the old code stepped a byte for each two drops, for ever)."""
    watch = PacketLimitWatch()
    watch.acked(5000)
    size, now, bounds = 40_000, 0.0, []
    for mid in range(EXACT_VERDICTS + 2):
        for _ in range(CLOSES):
            now += 1.0
            blame = watch.closed(now + 0.05, [_sent(mid, size, now)])
        assert blame is not None and blame.bound is not None
        bounds.append(blame.bound)
        size = blame.bound  # the next answer: just under the bound
    assert bounds == [39_999, 39_998, 39_997, 34_998, 30_624]


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
    message the broker takes is delivered, every one over is removed after CLOSES closes, and the
    bound learned is never below the broker's limit (nothing it takes is ever refused) while
    verdicts are exact."""
    watch = PacketLimitWatch()
    queue = [_sent(mid, size) for mid, size in enumerate(sizes)]
    delivered: list[int] = []
    closes, now = 0, 0.0
    while queue:
        now += 1.0
        watch.connected(now)
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
        assert closes <= CLOSES * len(sizes), "a message kept the device off the broker"
    taken = [mid for mid, size in enumerate(sizes) if size <= limit]
    if watch.verdicts <= EXACT_VERDICTS:
        assert delivered == taken
    else:  # what was not delivered before the bound fell below the limit is refused
        bound = watch.bound or limit
        assert set(delivered) <= set(taken)
        assert {mid for mid, size in enumerate(sizes) if size <= bound} <= set(delivered)
    # Past EXACT_VERDICTS verdicts (as many sizes over the limit), each takes an eighth off:
    # never more than that below the limit.
    if watch.verdicts <= EXACT_VERDICTS:
        assert watch.bound is None or watch.bound >= limit
    else:
        assert watch.bound is not None and watch.bound >= min(limit - limit // 8 - 1, limit)
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


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(MIN_SUSPECT, 70_000),
    sizes=st.lists(st.integers(100, 60_000), min_size=1, max_size=12),
    rate=st.integers(2_000, 200_000),
    drops=st.lists(st.one_of(st.none(), st.floats(0.0, 30.0)), min_size=1, max_size=30),
)
def test_link_drops_never_teach_a_bound_below_the_limit(
    limit: int, sizes: list[int], rate: int, drops: list[float | None]
) -> None:
    """A slow uplink (``rate`` bytes/s) that drops at any time (None: it holds) in front of a
    broker that closes at the first packet over ``limit``: the link alone must never make the
    agent learn a bound below the limit, unless it dropped CLOSES times in a row each within
    SOON_S of the resend (what no rule built on closes alone can tell from the broker's)."""
    watch = PacketLimitWatch()
    queue = [_sent(mid, size) for mid, size in enumerate(sizes)]
    now, in_window, evidence = 0.0, 0, False
    for drop in drops:  # each connection: paho sends the queue again, in order, at the CONNACK
        if not queue:
            break
        now += 100.0
        watch.connected(now)
        queue = [Unacked(u.mid, u.topic, u.size, now) for u in queue]
        done, over_at, ends = 0.0, None, []  # when each arrives whole; when the broker closes
        for u in queue:
            if u.size > limit and over_at is None:
                over_at = now + done / rate + 0.01  # it reads the header: closes at once
            done += u.size
            ends.append(now + done / rate)
        close = (
            min(t for t in (over_at, None if drop is None else now + drop) if t is not None)
            if over_at is not None or drop is not None
            else None
        )
        for i, u in enumerate(queue):  # the broker acknowledges what arrived before the close
            if (close is None or ends[i] < close) and (over_at is None or ends[i] < over_at):
                watch.acked(u.size, watch.suspect is not None and u.mid == watch.suspect.mid)
        acked = {u.mid for i, u in enumerate(queue) if (close is None or ends[i] < close)
                 and (over_at is None or ends[i] < over_at)}  # fmt: skip
        queue = [u for u in queue if u.mid not in acked]
        if close is None:
            break
        by_link = over_at is None or close < over_at
        in_window = in_window + 1 if by_link and close - now <= SOON_S else 0
        evidence = evidence or in_window >= CLOSES
        blame = watch.closed(close, queue)
        if blame is not None and blame.bound is not None:
            queue = [u for u in queue if u.size <= blame.bound]
    if not evidence and watch.verdicts <= EXACT_VERDICTS:
        assert watch.bound is None or watch.bound >= limit, (watch.bound, limit)


def _session(tmp_path: Path) -> Session:
    """A session never started: paho's callbacks are called as its network thread would."""
    config = AgentConfig(
        device="dev-p", broker="mqtt://127.0.0.1:1", data_dir=tmp_path,
        trust=[tmp_path / "unused.pub"], protocol="3.1.1", prefix="t",
    )  # fmt: skip
    return Session(config, will=("t/dev-p/status", b""), on_message=lambda _m: None)


def _connect(session: Session) -> None:
    session._handle_connect(
        session.client, None, mqtt.ConnectFlags(session_present=True),
        ReasonCode(PacketTypes.CONNACK, identifier=0), Properties(PacketTypes.CONNACK),
    )  # fmt: skip
    with session.client._out_message_mutex:  # sent again at the CONNACK, as paho does
        for m in session.client._out_messages.values():
            m.timestamp, m.state = time.monotonic(), mqtt.mqtt_ms_wait_for_puback


def _close(session: Session) -> None:
    """The socket closed, no DISCONNECT: what a broker over its limit and a link drop both do."""
    session._handle_disconnect(
        session.client, None, mqtt.DisconnectFlags(is_disconnect_packet_from_server=False),
        ReasonCode(PacketTypes.DISCONNECT, identifier=CONNECTION_LOST), None,
    )  # fmt: skip
    session.limit.drop_refused()


def _puback(session: Session, mid: int) -> None:
    with session.client._out_message_mutex:
        session.client._do_on_publish(mid, ReasonCode(PacketTypes.PUBACK), None)  # type: ignore[arg-type]


def test_a_takeover_is_told_while_each_close_finds_a_larger_answer_in_flight(
    tmp_path: Path,
) -> None:
    """Another client with our client id closes our connection soon after each reconnect, while
    the agent answers, each answer larger than the last: each close has a new suspect, which is
    no verdict, so the drops are the takeover's (the old code called every one explained)."""
    session = _session(tmp_path)
    for n in range(4):
        _connect(session)
        with session.client._out_message_mutex:
            for mid in list(session.client._out_messages):
                _puback(session, mid)  # the last answer got through this time
        session.publish(f"t/replies/{n}", b"r" * (2000 + 1000 * n))
        _connect_sent(session)
        _close(session)
    assert session.takeover.taken_over >= 2
    assert session.limit.bound is None and session.limit.refused == 0


def _connect_sent(session: Session) -> None:
    with session.client._out_message_mutex:  # what it published is on the wire
        for m in session.client._out_messages.values():
            m.state = mqtt.mqtt_ms_wait_for_puback


def test_a_mid_used_again_after_its_message_was_acknowledged_is_a_new_message(
    tmp_path: Path,
) -> None:
    """paho's mids wrap after 65535 publishes: the suspect of one close, acknowledged since,
    says nothing of a new message given its mid (the old code counted it the second close)."""
    session = _session(tmp_path)
    _connect(session)
    first = session.publish("t/replies/a", b"a" * 3000)
    _connect_sent(session)
    _close(session)  # a link drop while it was on its way: the suspect
    _connect(session)
    _puback(session, first.mid)  # the broker took it after the reconnect
    session.client._last_mid = first.mid - 1  # 65535 publishes later
    second = session.publish("t/replies/b", b"b" * 6000)
    assert second.mid == first.mid
    _connect_sent(session)
    _close(session)  # one drop while it is on its way
    assert session.limit.bound is None and session.limit.refused == 0
    assert second.mid in session.client._out_messages  # not taken out: sent again
