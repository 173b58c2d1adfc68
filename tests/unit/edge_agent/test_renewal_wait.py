"""When a renewal the service did not serve is tried again (``edge_agent.renewal_wait``): not
before the service's ``retry_after_s`` (with a jitter), never into the certificate's last
stretch, never faster than the backoff, whatever a buggy or hostile service sends; and the
agent's ``Renewer`` says when in its log and status. The previous agent tried again at its
backoff's pace whatever the answer said (the service's ``retry_after_s`` was never read)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cloud_sync.enroll import EnrollReply
from cloud_sync.fleet_ca import FleetCA, cert_pem, init_ca, new_key
from edge_agent.config import AgentConfig
from edge_agent.identity import KeyMaker, NotServed, Renewer
from edge_agent.identity_files import IdentityFiles, cert_window
from edge_agent.renewal_wait import (
    BACKOFF_FLOOR_S,
    EXPIRED_MAX_S,
    JITTER,
    JITTER_MAX_S,
    WAKE_S,
    backoff_s,
    last_stretch_at,
    next_try_in,
    reserve_s,
    spread_max_s,
    wait_until,
)

DAY = 86400.0
lives = st.floats(min_value=10.0, max_value=400 * DAY)
fractions = st.floats(min_value=0.0, max_value=1.0)
waits = st.floats(min_value=1e-3, max_value=30 * DAY)
# Not a number of seconds above 0: what a buggy or hostile service might send.
not_waits = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, True, False, "3600", [3600]]),
    st.floats(max_value=0.0),
    st.integers(max_value=0),
    st.integers(min_value=10**309, max_value=10**400),  # past a float
)


@given(
    life=lives,
    at=fractions,
    backoff=st.floats(min_value=0.0, max_value=300.0),
    asked=waits,
    reason=st.sampled_from(["renewal_budget", "rate_limited", "internal"]),
    draw=fractions,
    spread=fractions,
)
@example(
    life=90 * DAY,
    at=0.7,
    backoff=200.0,
    asked=3 * 3600.0,
    reason="renewal_budget",
    draw=1,
    spread=0,
)
def test_a_refusal_is_tried_again_no_sooner_than_asked_and_never_into_the_last_stretch(
    life: float, at: float, backoff: float, asked: float, reason: str, draw: float, spread: float
) -> None:
    not_before, now = 1_000_000.0, 1_000_000.0 + at * life
    not_after = not_before + life
    wait = next_try_in(backoff, reason, asked, now, not_before, not_after, lambda: draw, spread)
    assert math.isfinite(wait) and wait >= backoff  # never faster than the backoff
    if now >= not_after:  # expired (see the test below)
        assert wait <= max(backoff, EXPIRED_MAX_S)
        return
    reserve = reserve_s(not_before, not_after)
    last = not_after - reserve  # the last stretch starts here...
    # ...and a wait clamped to it ends up to a spread before it, this device's own.
    assert last_stretch_at(not_before, not_after, spread) >= last - spread_max_s(reserve)
    last = last_stretch_at(not_before, not_after, spread)
    if now + backoff >= last:
        assert wait == backoff  # in the last stretch: the backoff's pace, whatever was asked
        return
    assert now + wait <= last  # a try is left before the certificate ends
    if now + asked <= last:
        assert wait >= asked  # as long as the service asked: sooner is refused again
    assert wait <= max(backoff, asked + min(JITTER * asked, JITTER_MAX_S))


@given(life=lives, at=fractions, asked=waits)
def test_a_fleet_refused_together_comes_back_spread(life: float, at: float, asked: float) -> None:
    not_before, now = 0.0, at * life
    not_after = life
    early, late = (
        next_try_in(1.0, "renewal_budget", asked, now, not_before, not_after, lambda d=d: d)
        for d in (0.0, 1.0)
    )
    if asked > 1.0 and now + asked * (1 + JITTER) < not_after - reserve_s(0.0, life):
        assert late - early == pytest.approx(min(JITTER * asked, JITTER_MAX_S))


@given(asked=not_waits, life=lives, at=fractions, backoff=st.floats(0.0, 300.0))
def test_what_is_not_a_wait_and_replayed_keep_the_backoffs_pace(
    asked: Any, life: float, at: float, backoff: float
) -> None:
    now = at * life
    assert next_try_in(backoff, "renewal_budget", asked, now, 0.0, life) == backoff
    # replayed spent nothing: asked again at once, whatever it carries.
    assert next_try_in(backoff, "replayed", 3600.0, now, 0.0, life) == backoff


class Refusing:
    """A channel whose service answers every renewal with ``answer`` (the id filled in)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer, self.handler, self.asked = answer, None, 0

    def route(self, topic_filter: str, handler: Any) -> None:
        self.handler = handler

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.asked += 1
        reply = EnrollReply(**{**self.answer, "id": json.loads(payload)["id"]})
        assert self.handler is not None
        self.handler(SimpleNamespace(payload=reply.model_dump_json()))

    def use_identity(self, cert_file: Path, key_file: Path) -> None: ...

    def wait_connected(self, timeout: float) -> bool:
        return True


def _renewer(tmp_path: Path, channel: Refusing, life_s: float) -> Renewer:
    init_ca(tmp_path / "ca")
    ca = FleetCA.load(tmp_path / "ca")
    cert = ca.sign_device_csr(KeyMaker().csr(new_key(), "wait-a"), "wait-a", life_s / DAY)
    files = IdentityFiles(tmp_path / "identity")
    files.dir.mkdir()
    files.cert.write_bytes(cert_pem(cert))
    config = AgentConfig(device="wait-a", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    return Renewer(config, channel, files, lambda *_: None)


def test_the_renewer_waits_as_asked_and_says_when_in_its_log_and_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    answer = {"ok": False, "reason": "renewal_budget", "error": "spent", "retry_after_s": 7200.0}
    channel = Refusing(answer)
    renewer = _renewer(tmp_path, channel, 10 * DAY)
    with pytest.raises(NotServed) as refused:
        renewer.renew_once()
    before = time.time()
    wait = renewer._after_failure(1, refused.value) - before  # when, on the wall clock
    assert 7200.0 <= wait <= 7200.0 * (1 + JITTER) + 1.0  # the previous agent: under 75 s
    status = renewer.files.read_status()
    assert status["state"] == "valid" and status["renew_after"] >= before + 7200.0
    assert "renewal_budget" in status["reason"] and "trying again in" in status["reason"]
    assert "trying again in 7" in caplog.text and "(renewal_budget)" in caplog.text
    # The same answer with the certificate near its end: the backoff's pace, not 2 h.
    _, not_after, _ = cert_window(renewer.files.cert)
    late = next_try_in(60.0, "renewal_budget", 7200.0, not_after - 3000, 0.0, not_after)
    assert late == 60.0
    assert channel.asked == 1


@given(
    asked=waits,
    past=st.floats(min_value=0.0, max_value=30 * DAY),
    failures=st.integers(1, 20),
    draw=fractions,
)
@example(asked=870.0, past=1.0, failures=1, draw=0.0)
def test_an_expired_certificate_still_connected_waits_as_asked_at_most_five_minutes(
    asked: float, past: float, failures: int, draw: float
) -> None:
    """The broker keeps a session whose certificate expired: the previous agent, refused, asked
    every 0.5-1 s (its backoff's cap is a tenth of the life left: none), whatever it was told."""
    not_before, not_after = 0.0, 45.0
    now = not_after + past
    backoff = backoff_s(failures, now, not_after, lambda: draw)
    assert backoff >= BACKOFF_FLOOR_S  # the previous agent: 0.125-1 s
    wait = next_try_in(backoff, "renewal_budget", asked, now, not_before, not_after, lambda: draw)
    expected = max(backoff, min(asked * (1 + JITTER * draw), EXPIRED_MAX_S))
    assert wait == pytest.approx(expected, rel=1e-12)


@given(life=lives, at=fractions, asked=waits)
def test_a_batch_clamped_to_the_last_stretch_comes_back_spread(
    life: float, at: float, asked: float
) -> None:
    """Waits clamped to the last stretch ended in the same second for a whole batch."""
    now, not_after = at * life, life
    first, last = (
        next_try_in(1.0, "renewal_budget", asked, now, 0.0, not_after, lambda: 0.5, spread)
        for spread in (1.0, 0.0)
    )
    reserve = reserve_s(0.0, life)
    if (
        now + 1.0 < not_after - reserve - spread_max_s(reserve)
        and now + asked > not_after - reserve
    ):
        assert last - first == pytest.approx(spread_max_s(reserve), abs=1e-6 * life)


class Clock:
    """A wall clock that a sleep moves on by what was slept, and by ``jump`` more at one sleep
    (a suspend, or NTP setting the clock forward while the device slept, or back if negative);
    ``slept`` is the monotonic time the sleeps took (``monotonic``)."""

    def __init__(self, jump: float, at_sleep: int) -> None:
        self.now, self.jump, self.at_sleep, self.sleeps, self.slept = 1e9, jump, at_sleep, 0, 0.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return 5e5 + self.slept

    def wait(self, seconds: float) -> bool:  # threading.Event.wait, never set here
        self.sleeps += 1
        self.slept += seconds
        self.now += seconds + (self.jump if self.sleeps == self.at_sleep else 0.0)
        return False


@given(
    wait=st.floats(min_value=1.0, max_value=60 * DAY),
    jump=st.floats(min_value=0.0, max_value=60 * DAY),
    at_sleep=st.integers(1, 50),
    clamp=st.one_of(st.none(), st.floats(min_value=1.0, max_value=60 * DAY)),
)
@example(wait=2 * DAY, jump=10 * 3600.0, at_sleep=1, clamp=None)
def test_a_wait_ends_on_the_wall_clock_whatever_the_device_slept_through(
    wait: float, jump: float, at_sleep: int, clamp: float | None
) -> None:
    """The previous agent slept a wait in one monotonic stretch: suspended for 10 h of a 2-day
    wait, or set 10 h forward by NTP, it woke 10 h past its target on the wall clock (into the
    certificate's last stretch, or past its end). Now it sleeps at most ``WAKE_S`` at a time and
    reads the wall clock (and the clamp, ``latest``) at each wake."""
    clock = Clock(jump, at_sleep)
    start = clock.now
    latest = None if clamp is None else (lambda: start + clamp)
    stop: Any = clock  # only its wait() is used
    assert wait_until(stop, start + wait, latest, clock.time, clock.monotonic) is False
    end = start + (wait if clamp is None else min(wait, clamp))
    assert clock.now >= end  # never sooner than asked
    tolerance = 1e-9 * (end - start) + 1e-6
    assert clock.slept <= end - start + tolerance  # never more than the wall clock's wait
    if clock.sleeps >= at_sleep:
        # The clock jumped at the end of sleep ``at_sleep``: from there the wait goes on only
        # for what is left of it on the wall clock (the previous agent slept all of ``wait``).
        assert clock.slept <= max(end - start - jump, at_sleep * WAKE_S) + tolerance
    else:
        assert clock.now == pytest.approx(end)


def test_a_wait_ends_at_the_clamp_read_at_a_wake() -> None:
    """The clamp is read again at each wake: a last stretch that begins sooner than it did when
    the wait began (another certificate installed meanwhile) ends the wait there."""
    clock = Clock(0.0, 0)
    start = clock.now
    clamps = iter([start + 10 * DAY, start + 600.0])

    def latest() -> float:
        return next(clamps, start + 600.0)

    stop: Any = clock
    assert wait_until(stop, start + 20 * DAY, latest, clock.time, clock.monotonic) is False
    assert clock.now == pytest.approx(start + 600.0)


def test_a_clock_set_back_during_a_wait_does_not_stretch_it() -> None:
    """An hour's wait, the clock set back a day after its first sleep: the previous agent slept
    25 h (to the target on the wall clock); the monotonic clock ends it after the hour."""
    clock = Clock(-DAY, 1)
    stop: Any = clock
    assert wait_until(stop, clock.now + 3600.0, None, clock.time, clock.monotonic) is False
    assert clock.sleeps >= 1 and clock.slept <= 3600.0 + WAKE_S


@given(
    wait=st.floats(min_value=1.0, max_value=60 * DAY),
    back=st.floats(min_value=0.0, max_value=60 * DAY),
    at_sleep=st.integers(1, 50),
    clamp=st.one_of(st.none(), st.floats(min_value=1.0, max_value=60 * DAY)),
)
def test_a_wait_is_never_slept_longer_than_asked_whatever_the_clock_is_set_back(
    wait: float, back: float, at_sleep: int, clamp: float | None
) -> None:
    clock = Clock(-back, at_sleep)
    start = clock.now
    latest = None if clamp is None else (lambda: start + clamp)
    stop: Any = clock
    assert wait_until(stop, start + wait, latest, clock.time, clock.monotonic) is False
    assert clock.slept <= wait * (1 + 1e-9) + 1e-6
    if clock.sleeps < at_sleep:  # never set back: the wall clock's end, as before
        assert clock.now == pytest.approx(start + (wait if clamp is None else min(wait, clamp)))


def test_an_answer_with_a_retry_after_s_that_is_no_number_keeps_its_certificate() -> None:
    """``true`` and ``"60"`` were read as 1 and 60 s (docs: ignored); ``[1]`` failed the whole
    answer, an ``ok`` one's certificate included, which the budget had already paid for."""
    for odd in ("true", '"60"', "[1]", "{}", "1" + "0" * 400):
        doc = f'{{"id": "r1", "ok": true, "certificate": "PEM", "retry_after_s": {odd}}}'
        reply = EnrollReply.model_validate_json(doc)
        assert (reply.ok, reply.certificate, reply.retry_after_s) == (True, "PEM", None), odd
    assert (
        EnrollReply.model_validate_json(
            '{"id": "r", "ok": false, "retry_after_s": 60}'
        ).retry_after_s
        == 60.0
    )
