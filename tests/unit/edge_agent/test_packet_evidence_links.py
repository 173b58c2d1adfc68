"""``edge_agent.packet_evidence`` against a model of the wire: a client that holds back what the
watch says while a row of closes is open (``hold_above``, sent at ``quiet_until``, as
``packet_limit.PacketLimit`` does with paho's queue), a slow uplink that may drop each
connection, and a broker that closes at the first packet over its limit. What must hold: a link
that drops soon after each reconnect never teaches a bound, and no drops teach one below the
limit unless they fell, time after time, in the second after the suspect's held-back send.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_agent.packet_evidence import (
    CLOSES,
    EARLY_S,
    EXACT_VERDICTS,
    JITTER_S,
    MIN_SUSPECT,
    SOON_S,
    PacketLimitWatch,
    Unacked,
)
from tests.support.packet_link_sim import held_send, one_message

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


def _dropping_at(
    ages: list[float],
    before: float,
    draws: list[float],
    gaps: list[float],
    lags: list[float] = [0.0],  # noqa: B006 (never changed)
) -> None:
    """A link that carries data and drops each connection at its age in ``ages`` (seconds after
    the CONNACK), after a large message went ``before`` s before the first drop, in front of a
    broker that takes everything; black-holed: whatever the agent sends is never acknowledged
    (the worst case: a message sent in time is acknowledged and clears the row). The watch holds
    the message back while its row is open and sends it a lag in ``lags`` after ``quiet_until``
    (as the watch lets it, ``send_now``) if the link is up."""
    watch = PacketLimitWatch(draw=_draws(draws))
    message = Unacked(1, "replies/1", 20_000, 0.0, 1)
    now, sent_at = 0.0, ages[0] - before
    for age, gap, lag in zip(itertools.cycle(ages), gaps, itertools.cycle(lags), strict=False):
        watch.connected(now)
        if watch.suspect is not None:  # held back until its release, if the link is up then
            sent_at = held_send(watch, now + age, lag)
        elif sent_at is None or sent_at < now:
            sent_at = now  # paho sends again at the CONNACK what it holds
        drop = now + age
        unacked = [] if sent_at is None else [replace(message, sent_at=sent_at)]
        watch.closed(drop, unacked)
        assert watch.bound is None and watch.verdicts == 0, (age, watch.quiet_until - now)
        now, sent_at = drop + gap, None


_DRAWS = st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8)
_GAPS = st.lists(st.floats(0.1, 60.0), min_size=CLOSES + 3, max_size=12)
# Ages of a connection: most around the first seconds and the old 10 s cap, some far past it.
_AGES = st.one_of(st.floats(0.0, 30.0), st.floats(0.0, 1000.0))


@settings(max_examples=500, deadline=None)
@given(age=_AGES, before=st.floats(0.0, SOON_S), draws=_DRAWS, gaps=_GAPS)
@example(age=11.1, before=0.6, draws=[0.5], gaps=[3.0] * 6)  # the review's: just past the cap
def test_a_link_that_drops_at_one_age_of_each_connection_teaches_no_bound(
    age: float, before: float, draws: list[float], gaps: list[float]
) -> None:
    """The reviews' case: a link that drops at the same age of every connection (a middlebox's
    idle timer, a radio's duty cycle). With the release at a fixed age (SOON_S) a drop up to a
    second after it came right after each release; with it past the last close's age capped at
    10 s and a jitter, a drop at 11 s came within the second after each release. Now, whatever
    the age (here up to far past any cap) and the draws: the drop finds the message held (the
    last close was under EARLY_S), or comes over SOON_S after its early release."""
    _dropping_at([age], before, draws, gaps)


_LAGS = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(
    age=st.one_of(st.sampled_from([3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 11.1]), _AGES),
    before=st.floats(0.0, SOON_S),
    draws=_DRAWS,
    gaps=_GAPS,
    lags=_LAGS,
)
@example(age=3.1, before=0.6, draws=[0.5], gaps=[3.0] * 6, lags=[0.8])  # the review's (RTT)
@example(age=3.6, before=0.6, draws=[0.9], gaps=[3.0] * 6, lags=[0.5])
@example(age=11.1, before=0.6, draws=[0.5], gaps=[3.0] * 6, lags=[1.0])
def test_a_link_that_drops_at_one_age_teaches_no_bound_whatever_the_send_lag(
    age: float, before: float, draws: list[float], gaps: list[float], lags: list[float]
) -> None:
    """The release's send comes a lag after ``quiet_until`` (the PINGREQ's round trip, up to
    a second here): an early release planned under 2 s went out, on a link with a 0.8 s round
    trip, in the second before a drop at 3.1 s each time, and taught a false bound. Decided at
    the send itself, whatever the lag: the drop finds it held, or comes over SOON_S after."""
    _dropping_at([age], before, draws, gaps, lags)


@settings(max_examples=500, deadline=None)
@given(
    ages=st.lists(st.floats(EARLY_S, 1000.0), min_size=1, max_size=6),
    before=st.floats(0.0, SOON_S),
    draws=_DRAWS,
    gaps=_GAPS,
    lags=_LAGS,
)
@example(ages=[11.1, 11.4], before=0.6, draws=[0.5], gaps=[3.0] * 6, lags=[0.0])
def test_a_link_whose_drops_all_come_late_teaches_no_bound(
    ages: list[float], before: float, draws: list[float], gaps: list[float], lags: list[float]
) -> None:
    """Any pattern of drop ages, repeated (periodic), each EARLY_S and the largest send lag or
    later into its connection: the release comes under 2 s in, and is sent (a lag later) over
    SOON_S before each drop, or waits for a late release past it. (Not covered: drops at 3 s
    to 3 s and the lag; there a lag can put an early send in the second before them.)"""
    late = [age + max(lags) for age in ages]
    _dropping_at(late, before, draws, gaps, lags)


@settings(max_examples=500, deadline=None)
@given(
    start=_AGES,
    steps=st.lists(st.floats(-1000.0, 0.8 * JITTER_S[0]), min_size=12, max_size=12),
    before=st.floats(0.0, SOON_S),
    draws=_DRAWS,
    gaps=_GAPS,
    lags=_LAGS,
)
@example(start=11.1, steps=[0.1, -0.1] * 6, before=0.6, draws=[0.5], gaps=[3.0] * 6, lags=[0.0])
# Review 98's: a late close (4.5 s), then the early release sent a lag (0.3 s) late, and a drop
# at 3.0 s, in the second after it but at EARLY_S: the third connection released early again.
@example(start=4.5, steps=[-1.5, -0.4] * 6, before=0.5, draws=[0.0, 0.7, 0.25], gaps=[3.0] * 6,
         lags=[0.3])  # fmt: skip
def test_a_drop_age_that_wanders_teaches_no_bound(
    start: float,
    steps: list[float],
    before: float,
    draws: list[float],
    gaps: list[float],
    lags: list[float],
) -> None:
    """A timer that wanders: each drop at most 0.2 s later into its connection than the one
    before (or any amount earlier), whatever the send's lag. A drop after an early release may
    come right after it (the lag may put it at EARLY_S or later), but the next release comes
    after that drop's age: the next drop, not over 0.25 s later, finds the suspect held."""
    ages = list(itertools.accumulate(steps, lambda age, step: max(0.0, age + step), initial=start))
    _dropping_at(ages, before, draws, gaps, lags)


def test_a_drop_in_the_second_after_a_lagging_early_release_teaches_no_bound() -> None:
    """Review 98's repro: a close at 4.5 s (late: the next release is early, 1.25 s in), sent
    0.3 s after its release; the link drops at 3.0 s, in the second after the send, and that
    close, at EARLY_S, was taken for a late one: the third connection released early again and
    its drop at 2.6 s gave the verdict. Now a close right after an early release is released
    after its age. With five closes to a verdict that repro alone no longer gets there; the
    same flaw does, in five drops (each at 3 s or more after an early release was taken for
    late, and released early again): 4.5, 3.2, 2.4, 3.5, 2.4 s."""
    _dropping_at([4.5, 3.0, 2.6], before=0.5, draws=[0.0, 0.7, 0.25], gaps=[3.0] * 6, lags=[0.3])
    draws = [0.5, 0.99, 0.0, 0.0, 0.0]
    _dropping_at([4.5, 3.2, 2.4, 3.5, 2.4], before=0.5, draws=draws, gaps=[3.0] * 6, lags=[0.3])


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(MIN_SUSPECT + 1, 60_000),
    first=_AGES,
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
)
def test_a_message_over_the_limit_waits_under_four_seconds_a_connection(
    size: int, first: float, draws: list[float]
) -> None:
    """The hold a real message over the limit costs, after its first close at any age of its
    connection (``first``): each release under EARLY_S + the jitter's top (4 s) after the
    CONNACK, whatever the draws. (The review's measure: a message published on a connection up
    for 15 s waited two holds of over 10 s each for its verdict.)"""
    watch = PacketLimitWatch(draw=_draws(draws))
    watch.connected(0.0)
    blame = watch.closed(first + HEADER_S, [Unacked(1, "replies/1", size, first, 1)])
    now = first + 5.0
    for n in range(1, CLOSES):
        watch.connected(now)
        sent = watch.quiet_until
        assert now + SOON_S <= sent < now + EARLY_S + JITTER_S[1]
        blame = watch.closed(sent + HEADER_S, [Unacked(1, "replies/1", size, sent, 1)])
        assert blame is not None and blame.closes == n + 1
        now = sent + 5.0
    assert blame is not None and blame.bound == size - 1


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(MIN_SUSPECT + 1, 60_000),
    first=_AGES,
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
    lag=st.floats(0.0, 1.0),
)
def test_whatever_the_draws_a_message_over_the_limit_is_found_in_closes_closes(
    size: int, first: float, draws: list[float], lag: float
) -> None:
    """The jitter and the send's lag cost a broker's real limit nothing but time: closed right
    after each send (the first ``first`` s into its connection, then at each actual send), the
    message gets its verdict at the CLOSES-th."""
    watch = PacketLimitWatch(draw=_draws(draws))
    now, blame = 0.0, None
    for n in range(CLOSES):
        watch.connected(now)
        sent = now + first if n == 0 else held_send(watch, float("inf"), lag)
        assert sent is not None and sent >= now + (0.0 if n == 0 else SOON_S)
        blame = watch.closed(sent + HEADER_S, [Unacked(1, "replies/1", size, sent, 1)])
        assert blame is not None and blame.closes == n + 1
        now = sent + 5.0
    assert blame is not None and blame.bound == size - 1 == watch.bound


def test_a_link_that_drops_at_random_under_five_seconds_rarely_teaches_a_bound() -> None:
    """Review 98's Monte Carlo (``benchmarks/packet_limit_false_bounds.py``), seeded: drops
    uniform in [0, 5] s into each connection, a round trip of 0.3 s, a broker that takes
    everything. With three closes to a verdict, 3% of messages needing 3 s of uplink were
    refused under a false bound, and 72% of messages the link never lets through reached one
    within 200 reconnects; with five, 0.13% and 4.6% (each close more: about 5 times fewer)."""
    rng = random.Random(98)
    slow = [one_message(rng, 3.0, 0.3, 5.0, 200) for _ in range(4000)]
    assert slow.count("false") <= 0.005 * len(slow)
    never = [one_message(rng, 1e9, 0.3, 5.0, 200) for _ in range(400)]
    assert never.count("false") <= 0.12 * len(never)
