"""``edge_agent.packet_evidence`` against a model of the wire: a client that holds back what the
watch says while a row of closes is open (``hold_above``, sent at ``quiet_until``, as
``packet_limit.PacketLimit`` does with paho's queue), a slow uplink that may drop each
connection, and a broker that closes at the first packet over its limit. What must hold: a link
that drops soon after each reconnect never teaches a bound, and no drops teach one below the
limit unless they fell, time after time, in the second after the suspect's held-back send.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.packet_evidence import (
    CLOSES,
    EXACT_VERDICTS,
    HOLD_CAP_S,
    MIN_SUSPECT,
    SOON_S,
    PacketLimitWatch,
    Unacked,
)

HEADER_S = 0.01  # the broker reads a packet's header this soon after it starts arriving


@dataclass(frozen=True)
class Connection:
    queue: list[Unacked]  # what the client still holds after it
    close: float | None  # when it closed; None: it held
    by_link: bool  # the link dropped it (else the broker, over its limit)
    released_at: float | None  # when what was held back was sent, if it was


def connection(
    watch: PacketLimitWatch,
    queue: list[Unacked],
    now: float,
    limit: int,
    rate: float,
    drop: float | None,
) -> Connection:
    """One connection accepted at ``now``: paho sends again at the CONNACK all it holds but what
    the watch holds back, which goes at ``quiet_until`` if the connection is still up; ``rate``
    bytes/s on the uplink, in order; the link drops ``drop`` s after the CONNACK (None: never)."""
    watch.connected(now)
    suspect = watch.suspect
    held = [u for u in queue if suspect is not None and u.size > watch.hold_above]
    held.sort(key=lambda u: (u.mid, u.seq) != (suspect.mid, suspect.seq) if suspect else 0)
    release = watch.quiet_until if held else None
    link_drop = None if drop is None else now + drop
    wire: list[tuple[Unacked, float]] = []  # (message as stamped, when its first byte goes)
    free = now
    for u in [u for u in queue if u not in held]:
        wire.append((Unacked(u.mid, u.topic, u.size, now, u.seq), free))
        free += u.size / rate
    if release is not None and (link_drop is None or link_drop > release):
        free = max(free, release)
        for u in held:
            wire.append((Unacked(u.mid, u.topic, u.size, release, u.seq), free))
            free += u.size / rate
    over_at = next((start + HEADER_S for u, start in wire if u.size > limit), None)
    ends = [t for t in (over_at, link_drop) if t is not None]
    close = min(ends) if ends else None
    unacked, acked = [], set()
    for u, start in wire:
        end = start + u.size / rate
        if (close is None or end < close) and (over_at is None or start + HEADER_S < over_at):
            watch.acked(
                u.size, suspect is not None and (u.mid, u.seq) == (suspect.mid, suspect.seq)
            )
            acked.add(u.mid)
        elif close is not None:  # paho counts all it sent at the CONNACK as sent
            unacked.append(u)
    left = [u for u in queue if u.mid not in acked]
    by_link = close is not None and (over_at is None or close < over_at)
    if close is not None:
        blame = watch.closed(close, unacked)
        if blame is not None and blame.bound is not None:
            left = [u for u in left if u.size <= blame.bound]
    sent_held = release is not None and (close is None or close > release)
    return Connection(left, close, by_link, release if sent_held else None)


def _queue(sizes: list[int]) -> list[Unacked]:
    return [Unacked(mid, f"replies/{mid}", size, 0.0, mid + 1) for mid, size in enumerate(sizes)]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(100, 60_000), min_size=1, max_size=12),
    rate=st.integers(1_000, 200_000),
    drops=st.lists(st.floats(0.0, SOON_S, exclude_max=True), min_size=CLOSES, max_size=12),
)
def test_a_link_that_drops_within_a_second_of_each_reconnect_teaches_no_bound(
    sizes: list[int], rate: int, drops: list[float]
) -> None:
    """The review's case: a flaky link that drops every connection within SOON_S of its CONNACK
    (so within SOON_S of paho's resend of whatever is in flight), CLOSES times in a row or more,
    in front of a broker that takes everything. Closes alone cannot tell it from a broker over
    its limit (the old rule learned a bound below the message in flight, which the broker takes);
    the held-back suspect is never sent before such a drop, so no row ever reaches a verdict,
    and once the link holds, everything is delivered."""
    watch = PacketLimitWatch()
    queue, now = _queue(sizes), 0.0
    for drop in [*drops, None]:
        now += 100.0
        result = connection(watch, queue, now, limit=1 << 28, rate=rate, drop=drop)
        queue = result.queue
        if result.close is None:
            break
    while queue:  # the link holds: the rest of what was held back goes too
        now += 100.0
        queue = connection(watch, queue, now, limit=1 << 28, rate=rate, drop=None).queue
    assert watch.bound is None and watch.verdicts == 0


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
    broker that closes at the first packet over ``limit``: the link alone never makes the agent
    learn a bound below the limit, unless it dropped CLOSES times in a row, each within SOON_S
    of a send, every one after the first within SOON_S after the held-back suspect went (the
    one pattern a broker over its limit makes, that no rule built on closes can refuse)."""
    watch = PacketLimitWatch()
    queue, now, run, evidence = _queue(sizes), 0.0, 0, False
    for drop in drops:
        if not queue:
            break
        now += 100.0
        result = connection(watch, queue, now, limit, rate, drop)
        queue = result.queue
        if result.close is None:
            break
        after_release = (
            result.released_at is not None and result.close - result.released_at <= SOON_S
        )
        if result.by_link and after_release and run:
            run += 1
        else:  # a row's first close: within SOON_S of the resend at the CONNACK, or of a release
            soon = result.close - now <= SOON_S or after_release
            run = 1 if result.by_link and soon else 0
        evidence = evidence or run >= CLOSES
    if not evidence and watch.verdicts <= EXACT_VERDICTS:
        assert watch.bound is None or watch.bound >= limit, (watch.bound, limit)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(MIN_SUSPECT, 40_000),
    sizes=st.lists(st.integers(100, 60_000), min_size=1, max_size=12),
)
def test_against_a_broker_that_drops_whoever_sends_over_its_limit(
    limit: int, sizes: list[int]
) -> None:
    """A fast link, a broker that acknowledges in order and closes the connection at the first
    packet over ``limit``, a client that sends everything unacknowledged again at each reconnect
    but what the watch holds back: every message the broker takes is delivered, every one over
    is removed after CLOSES closes, and the bound learned is never below the broker's limit
    (nothing it takes is ever refused) while verdicts are exact."""
    watch = PacketLimitWatch()
    queue, closes, now = _queue(sizes), 0, 0.0
    while queue:
        now += 100.0
        result = connection(watch, queue, now, limit, rate=1e9, drop=None)
        queue = result.queue
        if result.close is None:
            break
        closes += 1
        assert closes <= CLOSES * len(sizes), "a message kept the device off the broker"
    over = [size for size in sizes if size > limit]
    if watch.verdicts <= EXACT_VERDICTS:
        assert watch.bound is None or watch.bound >= limit
    else:  # past EXACT_VERDICTS verdicts each takes an eighth off: never more below the limit
        assert watch.bound is not None and watch.bound >= min(limit - limit // 8 - 1, limit)
    assert (watch.bound is not None) == bool(over)


def _draws(values: list[float]) -> Callable[[], float]:
    """The watch's random source, injected: these draws, in turn, for ever."""
    each = itertools.cycle(values)
    return lambda: next(each)


@settings(max_examples=300, deadline=None)
@given(
    age=st.floats(0.0, HOLD_CAP_S),
    before=st.floats(0.0, SOON_S),
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
    gaps=st.lists(st.floats(0.1, 60.0), min_size=CLOSES + 3, max_size=12),
)
def test_a_link_that_drops_at_one_age_of_each_connection_teaches_no_bound(
    age: float, before: float, draws: list[float], gaps: list[float]
) -> None:
    """The review's case: a link that carries data and then drops at the same age of every
    connection (a middlebox's idle timer, a radio's duty cycle), after a large message went in
    the second before the first drop, in front of a broker that takes everything. With the
    release at a fixed age (SOON_S) a drop up to a second after it came right after each release:
    CLOSES drops taught a false bound. The release now waits past the age of the row's last close
    and a jitter (from the injected draws, whatever they are): the drop finds it held."""
    watch = PacketLimitWatch(draw=_draws(draws))
    message = Unacked(1, "replies/1", 20_000, 0.0, 1)
    now, sent_at = 0.0, age - before  # first published in the second before the first drop
    for gap in gaps:
        watch.connected(now)
        if watch.suspect is not None:  # held back until its release, if the link is up then
            release = watch.quiet_until
            sent_at = release if release < now + age else None
        elif sent_at is None or sent_at < now:
            sent_at = now  # paho sends again at the CONNACK what it holds
        drop = now + age
        unacked = [] if sent_at is None else [replace(message, sent_at=sent_at)]
        watch.closed(drop, unacked)
        assert watch.bound is None and watch.verdicts == 0
        now, sent_at = drop + gap, None


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(MIN_SUSPECT + 1, 60_000),
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
)
def test_whatever_the_draws_a_message_over_the_limit_is_found_in_closes_closes(
    size: int, draws: list[float]
) -> None:
    """The jitter costs a broker's real limit nothing but time: closed right after each send
    (at the CONNACK, then at each release), the message gets its verdict at the CLOSES-th."""
    watch = PacketLimitWatch(draw=_draws(draws))
    now, blame = 0.0, None
    for n in range(CLOSES):
        watch.connected(now)
        sent = now if n == 0 else watch.quiet_until
        assert sent >= now + (0.0 if n == 0 else SOON_S)
        blame = watch.closed(sent + HEADER_S, [Unacked(1, "replies/1", size, sent, 1)])
        assert blame is not None and blame.closes == n + 1
        now = sent + 5.0
    assert blame is not None and blame.bound == size - 1 == watch.bound
