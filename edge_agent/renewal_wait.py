"""How long the agent waits before it tries a renewal again after one that was not served.

Import path and API (pure: numbers in, seconds out)::

    from edge_agent.renewal_wait import next_try_in
    wait = next_try_in(backoff_s, reason, retry_after_s, now, not_before, not_after)

Why: a refusal that says "not now" may say when (``retry_after_s``: with ``renewal_budget``,
when one of the device's renewals is free again). Asked sooner, the service refuses again, and
each try costs it a read of the device's record in the store: a device that kept its backoff
pace (2.5-5 minutes) asked up to ~500 times in a 24 h window. So the next try waits at least
``retry_after_s``, and up to a tenth of it more (at most ``JITTER_MAX_S``), so that a fleet
refused together does not come back in the same second.

Bounds, because the service's word is not trusted with the device's life:

- never past the certificate's last stretch (``reserve_s``: a tenth of its life, at most an
  hour): a wait that would end there ends at its start, and from there the tries go at the
  backoff's pace whatever the service says, since an expired certificate is an outage (the
  operator may raise the budget, another service may answer);
- never shorter than the backoff (``retry_after_s`` of 0 does not make a device hammer);
- a value that is not a finite number above 0 (a buggy or hostile service) is ignored;
- ``replayed`` (the request's id already answered: a duplicate delivery) spends nothing and
  is tried again at once as a new request, at the backoff's pace, whatever it carries.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

JITTER = 0.1  # a tenth of the service's wait, on top of it...
JITTER_MAX_S = 300.0  # ...at most the backoff's own cap
RESERVE_SHARE, RESERVE_MAX_S = 0.1, 3600.0  # the last stretch of the life: tries at backoff pace
PROMPT = frozenset({"replayed"})  # refusals that spent nothing: asked again at once


def reserve_s(not_before: float, not_after: float) -> float:
    """The certificate's last stretch, kept for tries at the backoff's pace."""
    return min(RESERVE_MAX_S, RESERVE_SHARE * max(0.0, not_after - not_before))


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
) -> float:
    """Seconds until the next try: the backoff's, or the service's ``retry_after_s`` and a
    jitter when it asked for longer, ended early enough to leave the certificate's last stretch
    to tries at the backoff's pace (the module's docstring says why)."""
    asked = None if reason in PROMPT else asked_wait(retry_after_s)
    if asked is None:
        return backoff_s
    until_last = not_after - reserve_s(not_before, not_after) - now
    if until_last <= backoff_s:
        return backoff_s  # in the last stretch already: an expired certificate is an outage
    jittered = asked + min(JITTER * asked, JITTER_MAX_S) * draw()
    return max(backoff_s, min(jittered, until_last))
