"""How long the agent waits before it tries a renewal again after one that was not served,
and how it sleeps that long.

Import path and API (numbers in, seconds out; ``wait_until`` sleeps; ``NotServed`` is the
"not now" answer the renewer raises, with what the service said)::

    from edge_agent.renewal_wait import NOT_NOW, NotServed, backoff_s, next_try_in, wait_until
    backoff = backoff_s(failures, now, not_after)
    wait = next_try_in(backoff, reason, retry_after_s, now, not_before, not_after, spread=s)
    stopped = wait_until(stop_event, now + wait, latest=lambda: last_stretch_at(nb, na, s))
    window = LastWindow(cert_path); window.read()   # the last window read if unreadable now

Why: a refusal that says "not now" may say when (``retry_after_s``: with ``renewal_budget``,
when one of the device's renewals is free again). Asked sooner, the service refuses again, and
each try costs it a read of the device's record in the store: a device that kept its backoff
pace (2.5-5 minutes) asked up to ~500 times in a 24 h window. So the next try after any "not
now" answer that carries one (``renewal_budget``, ``rate_limited``, ``internal``) waits at
least ``retry_after_s``, and up to a tenth of it more (at most ``JITTER_MAX_S``), so that a
fleet refused together does not come back in the same second.

Bounds, because the service's word is not trusted with the device's life:

- never past the certificate's last stretch (``reserve_s``: a tenth of its life, at most an
  hour): a wait that would end there ends before it, by the device's own ``spread`` of up to a
  tenth of the stretch (at most ``JITTER_MAX_S``: a batch clamped together does not come back
  in one second), and from there the tries go at the backoff's pace whatever the service says,
  since an expired certificate is an outage (the operator may raise the budget, another
  service may answer);
- once the certificate has expired (the broker keeps a live session: it checks certificates
  at the handshake only), a wait asked for is waited, up to ``EXPIRED_MAX_S``: there is no last
  stretch to save any more, and at the backoff's pace (its cap is a tenth of the life left,
  none) the device asked every second;
- never shorter than the backoff, which is never under ``BACKOFF_FLOOR_S``
  (``retry_after_s`` of 0 does not make a device hammer);
- a value that is not a finite number above 0 (a buggy or hostile service) is ignored;
- ``replayed`` (the request's id already answered: a duplicate delivery) spends nothing and
  is tried again at once as a new request, at the backoff's pace, whatever it carries.

Waits are kept on the wall clock (``wait_until``): the certificate's times are, and a wait
slept in one monotonic stretch overran them by as long as the device was suspended, or by a
correction NTP made forward, into its last stretch or past its expiry. A wait also ends after
its length on the monotonic clock: a clock set back a day stretched an hour's wait to 25 h.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.enroll import EnrollReply
from edge_agent.identity_files import cert_window
from modelpack.errors import BrokerError, ConfigError

log = logging.getLogger("edge_agent.identity")

JITTER = 0.1  # a tenth of the service's wait, on top of it...
JITTER_MAX_S = 300.0  # ...at most the backoff's own cap
RESERVE_SHARE, RESERVE_MAX_S = 0.1, 3600.0  # the last stretch of the life: tries at backoff pace
PROMPT = frozenset({"replayed"})  # refusals that spent nothing: asked again at once
BACKOFF_MAX_S, BACKOFF_FLOOR_S = 300.0, 3.0
EXPIRED_MAX_S = 300.0  # an expired certificate: the longest wait a service's word buys
WAKE_S = 300.0  # the longest one sleep: the wall clock is read again after it
RENEW_JITTER = 0.03  # the renewal point's spread, +-3 % of the life: a fleet renews spread


# Answers that say "not now", not "never": a busy or flooded service (its rate limit), one that
# failed on its side (the store unreachable), the device's renewal budget spent for now (answers
# lost on the way spend it too), or a request the service already answered (a duplicate
# delivery whose first answer was lost). A renewal answered so is tried again as a new request,
# not before the answer's ``retry_after_s`` where it fits the certificate's life
# (``next_try_in``); only a refusal of the device itself (revoked, not enrolled, a bad CSR)
# ends it.
NOT_NOW = frozenset({"rate_limited", "internal", "renewal_budget", "replayed"})


class NotServed(BrokerError):
    """A renewal answered "not now" (``NOT_NOW``): its reason, and when the service said to ask
    again (``retry_after_s``, as it came: ``next_try_in`` judges it)."""

    def __init__(self, reply: EnrollReply) -> None:
        super().__init__(f"the renewal was not served ({reply.reason}): {reply.error}")
        self.reason, self.retry_after_s = reply.reason, reply.retry_after_s


def reserve_s(not_before: float, not_after: float) -> float:
    """The certificate's last stretch, kept for tries at the backoff's pace."""
    return min(RESERVE_MAX_S, RESERVE_SHARE * max(0.0, not_after - not_before))


def spread_max_s(reserve: float) -> float:
    """How much sooner than the last stretch a wait clamped to it may end."""
    return min(JITTER_MAX_S, JITTER * reserve)


def last_stretch_at(not_before: float, not_after: float, spread: float) -> float:
    """When a wait the service asked for ends at the latest: the last stretch's start, less
    ``spread`` (0-1, drawn once per device) of ``spread_max_s``."""
    reserve = reserve_s(not_before, not_after)
    return not_after - reserve - spread * spread_max_s(reserve)


def backoff_s(
    failures: int, now: float, not_after: float, draw: Callable[[], float] = random.random
) -> float:
    """The backoff after ``failures`` failed tries in a row: up to a tenth of the life left (at
    most ``BACKOFF_MAX_S``), a quarter of it more each failure, never under the floor."""
    cap = min(BACKOFF_MAX_S, max(0.0, not_after - now) / 10)
    return max(BACKOFF_FLOOR_S, cap * (0.5 + 0.5 * draw()) * min(1.0, 0.25 * failures))


def asked_wait(retry_after_s: object) -> float | None:
    """The service's ``retry_after_s`` if it is a finite number of seconds above 0, else None."""
    if not isinstance(retry_after_s, int | float) or isinstance(retry_after_s, bool):
        return None
    try:
        wait = float(retry_after_s)
    except OverflowError:  # an integer of 400 digits
        return None
    return wait if math.isfinite(wait) and wait > 0 else None


def next_try_in(
    backoff_s: float,
    reason: str | None,
    retry_after_s: object,
    now: float,
    not_before: float,
    not_after: float,
    draw: Callable[[], float] = random.random,
    spread: float = 0.0,
) -> float:
    """Seconds until the next try: the backoff's, or the service's ``retry_after_s`` and a
    jitter when it asked for longer, ended early enough to leave the certificate's last stretch
    to tries at the backoff's pace, or at most ``EXPIRED_MAX_S`` once it expired (the module's
    docstring says why)."""
    asked = None if reason in PROMPT else asked_wait(retry_after_s)
    if asked is None:
        return backoff_s
    jittered = asked + min(JITTER * asked, JITTER_MAX_S) * draw()
    if now >= not_after:  # still connected on an expired certificate: nothing left to save
        return max(backoff_s, min(jittered, EXPIRED_MAX_S))
    until_last = last_stretch_at(not_before, not_after, spread) - now
    if until_last <= backoff_s:
        return backoff_s  # in the last stretch already: an expired certificate is an outage
    return max(backoff_s, min(jittered, until_last))


def try_again_in(
    failures: int, exc: Exception, now: float, not_before: float, not_after: float, spread: float
) -> float:
    """Seconds until the try after ``exc``, the ``failures``-th in a row: the backoff, or as
    long as the service asked if it said "not now" (``NotServed``, ``next_try_in``)."""
    reason = exc.reason if isinstance(exc, NotServed) else None
    asked = exc.retry_after_s if isinstance(exc, NotServed) else None
    backoff = backoff_s(failures, now, not_after)
    return next_try_in(backoff, reason, asked, now, not_before, not_after, spread=spread)


def wait_until(
    stop: threading.Event,
    target: float,
    latest: Callable[[], float] | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> bool:
    """Sleep until ``target`` on the wall clock (``clock``), or ``latest()`` if that comes
    first (read again at each wake), in sleeps of at most ``WAKE_S``; True when ``stop`` was
    set instead. A device suspended, or its clock set forward, wakes at most ``WAKE_S`` of
    wall time past the target, not the whole wait; a clock set back does not stretch it either:
    it also ends once ``monotonic`` has run the wait's length from its start."""
    deadline = monotonic() + (target - clock())
    while True:
        end = target if latest is None else min(target, latest())
        left = min(end - clock(), deadline - monotonic())
        if left <= 0:
            return False
        if stop.wait(min(WAKE_S, left)):
            return True


class LastWindow:
    """The certificate's window (not_before, not_after, serial) as last read from ``path``:
    a file that cannot be read now (half written, damaged, deleted) leaves the renewer going by
    the last one it read, and says so (``said``), rather than ending it: a renewer gone while
    the status still says ``valid`` let the certificate expire, however the file was repaired.
    ``read`` raises only when no window was ever read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.window: tuple[float, float, str] | None = None
        self.unreadable: str | None = None  # why the file could not be read at the last read

    def read(self) -> tuple[float, float, str]:
        try:
            self.window, self.unreadable = cert_window(self.path), None
        except (OSError, ValueError, ConfigError) as exc:
            if self.window is None:
                raise
            if self.unreadable is None:
                log.error(
                    "the certificate on disk cannot be read (%s): going by the last read, %s",
                    exc,
                    self.window[2],
                )
            self.unreadable = str(exc)
        return self.window

    def serial(self) -> str:
        """The serial as read last ("unknown" if none ever was): an answered renewal installs
        its certificate whatever the file on disk is now."""
        try:
            return self.read()[2]
        except (OSError, ValueError, ConfigError):
            return "unknown"

    def last_stretch(self, spread: float) -> float:
        """``last_stretch_at`` of the window: a wait's clamp, read at each wake."""
        not_before, not_after, _ = self.read()
        return last_stretch_at(not_before, not_after, spread)

    def said(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` for the status, the reason led by the unreadable file's, if it is."""
        if self.unreadable is None:
            return fields
        said = f"the certificate on disk cannot be read: {self.unreadable}"
        reason = fields.get("reason")
        return {**fields, "reason": f"{said}; {reason}" if reason else said}
