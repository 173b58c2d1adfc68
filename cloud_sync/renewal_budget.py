"""How many renewals one device gets per window, kept in its signed record in the store.

Import path and API (pure: a device's record in, the changed record out; ``Renewals`` applies
it inside the record's compare-and-swap)::

    from cloud_sync.renewal_budget import RenewalBudget, budget_from_env, spend, refusal
    budget = RenewalBudget(count=4, window_s=86400)     # or parse_budget("4/24h")
    refusal(doc, budget, now, request_id)    # ClaimRefused("renewal_budget"/"replayed") or None
    doc = spend(doc, budget, now, request_id)   # the spend stamped in; raises as refusal does
    check_fits(budget, validity_s=90 * 86400)   # ConfigError: the fleet would expire under it
    wait_room_s(budget, validity_s)   # life left at renewal that lets a refused device wait
    renewal_spacing(validity_s=90 * 86400)      # (shortest time between renewals, least life left)

Why: every renewal adds a certificate that the CRL lists once it is retired (rotated away from,
or left unconfirmed: ``cloud_sync.identity_rotation``), until it expires. The service's rate
limit is one renewal a second per device, so a stolen device key could add ~86,400 entries a
day to the CRL that every device and the broker load (its builder is superlinear: 100k entries
took 40.8 s). The budget caps that at ``count`` per ``window_s`` for each device: at most
``count`` x the certificate's days listed per device, whoever holds its key.

The budget is the record's (``DeviceIdentity.renewals``: when, and the request's id), not the
key's or the request's: a device that rotates to a new key keeps it, a revoked device enrolled
again keeps it, and nothing the device sends refills it. It is spent inside the compare-and-swap
that records the certificate, so two enrollment services sharing the store, or concurrent
requests, each count: one of two racing writes re-reads the other's spend. A request whose id
is already spent (a duplicate delivery, two services both subscribed) is refused as
``replayed`` and spends nothing.

Clocks: a spend is stamped with the service's own clock; one stamped ahead of this service's
clock (by up to a window) still counts, so a service whose clock runs behind is stricter, never
looser. Services whose clocks are at most d < ``window_s`` apart let ``count`` through per
``window_s - d`` of true time. A stamp more than a window ahead (a clock set years forward) is
not counted (a WARNING) rather than locking the device out until that date, but it is kept:
with two services whose clocks are more than a window apart each still holds the device to
``count`` per window of its own (2 x ``count`` in all). Each write keeps every stamp newer than
``now - window_s`` and the ``count`` last written older ones (``_kept``), at most
``MAX_COUNT``; three or more services whose clocks are each more than a window from the others
are not bounded (run the enrollment hosts with NTP).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

from cloud_sync.fleet_ca import backdate_s
from cloud_sync.identity_claims import ClaimRefused
from cloud_sync.identity_records import DeviceIdentity, RenewalSpend
from modelpack.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "EDGEBENTO_RENEWAL_BUDGET"
DEFAULT = "4/24h"  # a device renews once per 60 days; 4 leaves room for lost answers
MAX_COUNT = 100  # each spend is kept in the record (~90 bytes): the record stays under its cap
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
AGENT_RENEW_AT = 2 / 3  # edge_agent.config's renew_at: the agent renews at 2/3 of the life
AGENT_JITTER = 0.03  # edge_agent.renewal_wait's RENEW_JITTER: +-3 % of the life
# edge_agent.renewal_wait: the last stretch of the life (a tenth, at most an hour), tried at the
# backoff's pace; a wait the service asked for ends before it, by up to a tenth of it more
# (at most 5 minutes); edge_agent.identity's REPLY_TIMEOUT_S: an answer lost is known then.
AGENT_RESERVE_SHARE, AGENT_RESERVE_MAX_S, AGENT_SPREAD_MAX_S = 0.1, 3600.0, 300.0
AGENT_REPLY_TIMEOUT_S = 20.0
SLACK_S = 60.0  # the renewal's own delays: a reconnect, the service's queue


@dataclass(frozen=True)
class RenewalBudget:
    count: int = 4
    window_s: float = 86400.0

    def __str__(self) -> str:
        return f"{self.count} renewals per {self.window_s / 3600:g} h"


def parse_budget(text: str) -> RenewalBudget:
    """``COUNT/WINDOW``: ``4/24h``, ``10/7d``, ``2/30m``. ConfigError otherwise."""
    found = _SPEC.match(text)
    if not found:
        raise ConfigError(f"{text!r} is not a renewal budget like 4/24h (renewals per window)")
    count, window_s = int(found.group(1)), float(found.group(2)) * _UNITS[found.group(3)]
    if not 1 <= count <= MAX_COUNT or window_s <= 0:
        raise ConfigError(f"a renewal budget is 1 to {MAX_COUNT} renewals per positive window")
    return RenewalBudget(count, window_s)


def budget_from_env() -> RenewalBudget:
    """``$EDGEBENTO_RENEWAL_BUDGET``, else ``DEFAULT``."""
    return parse_budget(os.environ.get(ENV) or DEFAULT)


def _counted(doc: DeviceIdentity, budget: RenewalBudget, now: float) -> list[RenewalSpend]:
    """The spends inside the window, stamps ahead of ``now`` by up to a window included."""
    kept, ahead = [], []
    for spent in doc.renewals:
        if spent.at > now + budget.window_s:
            ahead.append(spent.at - now)
        elif spent.at > now - budget.window_s:
            kept.append(spent)
    if ahead:  # one line a check, however many stamps (up to 100 are kept)
        log.warning(
            "%s: %d renewal(s) stamped up to %.0f s ahead of this clock are not counted (a "
            "service clock set forward)", doc.device, len(ahead), max(ahead),
        )  # fmt: skip
    return kept


def refusal(
    doc: DeviceIdentity, budget: RenewalBudget, now: float, request_id: str | None
) -> ClaimRefused | None:
    """Why ``doc``'s device may not renew now (None: it may)."""
    counted = _counted(doc, budget, now)
    if request_id is not None and any(s.request == request_id for s in counted):
        return ClaimRefused("replayed", f"renewal request {request_id!r} was already answered")
    if len(counted) < budget.count:
        return None
    # The spend whose leaving frees one (more than ``count`` held: a budget lowered since).
    free_at = sorted(s.at for s in counted)[len(counted) - budget.count] + budget.window_s
    wait = max(1.0, free_at - now)
    return ClaimRefused(
        "renewal_budget",
        f"{doc.device} has renewed {len(counted)} times in the last "
        f"{budget.window_s / 3600:g} h (budget: {budget}): try again in {wait:.0f} s",
        retry_after_s=wait,
    )


def spend(
    doc: DeviceIdentity, budget: RenewalBudget, now: float, request_id: str | None
) -> DeviceIdentity:
    """``doc`` with one renewal spent at ``now``; ClaimRefused as ``refusal`` says."""
    refused = refusal(doc, budget, now, request_id)
    if refused is not None:
        raise refused
    kept = [*_kept(doc, budget, now), RenewalSpend(at=now, request=request_id or "")]
    return doc.model_copy(update={"renewals": kept[-MAX_COUNT:]})


def _kept(doc: DeviceIdentity, budget: RenewalBudget, now: float) -> list[RenewalSpend]:
    """The spends written back, in the order they were written: every one newer than
    ``now - window``, those too far ahead to count included (another service's, whose clock
    runs ahead: dropping them gave that service its budget back at each write of this one),
    and the ``count`` last written of the older ones (those of a service whose clock runs
    behind by more than a window look old here, and are the last older ones written: that
    service still counts its own). Nothing else: an honest device's record stays small."""
    old = [i for i, s in enumerate(doc.renewals) if s.at <= now - budget.window_s]
    dropped = set(old[: max(0, len(old) - budget.count)])
    return [s for i, s in enumerate(doc.renewals) if i not in dropped]


def renewal_spacing(validity_s: float, renew_at: float = AGENT_RENEW_AT) -> tuple[float, float]:
    """(the shortest time between two renewals of an agent, the least life its certificate has
    left at a renewal) for certificates of ``validity_s`` issued by the fleet CA. The agent
    renews at ``renew_at`` (+-jitter) of the life from ``not_valid_before``, which the CA sets
    before the moment of issue (``backdate_s``): the life is longer than ``validity_s`` and the
    renewal comes earlier after the issue than ``renew_at`` x ``validity_s``. X.509 times are
    whole seconds: one more is taken off."""
    back = backdate_s(validity_s)
    life = validity_s + back
    every = (renew_at - AGENT_JITTER) * life - back - 1.0
    return every, (1 - renew_at - AGENT_JITTER) * life


def wait_room_s(budget: RenewalBudget, validity_s: float) -> float:
    """The life a certificate must have left at its renewal point for a device refused after
    one lost answer to wait for the budget to free before its last stretch begins: a window
    (the lost answer's spend frees then), the last stretch (``edge_agent.renewal_wait``: from
    there the device tries at its backoff's pace, and by its end the certificate is gone), the
    spread by which a wait ends before it, the time an answer is waited for, and slack."""
    life = validity_s + backdate_s(validity_s)
    reserve = min(AGENT_RESERVE_MAX_S, AGENT_RESERVE_SHARE * life)
    spread = min(AGENT_SPREAD_MAX_S, AGENT_RESERVE_SHARE * reserve)
    return budget.window_s + reserve + spread + AGENT_REPLY_TIMEOUT_S + SLACK_S


def check_fits(budget: RenewalBudget, validity_s: float, renew_at: float = AGENT_RENEW_AT) -> None:
    """ConfigError when agents renewing certificates of ``validity_s`` at ``renew_at`` of their
    life (jitter and the CA's backdating included: ``renewal_spacing``) need more than
    ``budget.count`` renewals in a window: refused ones wait (``retry_after_s``) past the life
    left and the fleet expires. Room is kept for one lost answer per window (tried again, it
    spends again) unless the certificate outlives ``wait_room_s`` after its renewal point, when
    a refused device can wait for the budget to free before its last stretch (the agent waits
    as asked, and in the last stretch at its backoff's pace: ``edge_agent.renewal_wait``).
    Skipping the room as soon as the certificate outlived a window (as before) let ``1/24h``
    take validities from 79.04 h, where after a lost answer the budget freed ~0-68 s before
    the certificate ended, long after the device's last stretch had begun."""
    every, left = renewal_spacing(validity_s, renew_at)
    need = math.ceil(budget.window_s / every) if every > 0 else MAX_COUNT + 1
    if left < wait_room_s(budget, validity_s):
        need += 1
    if need > budget.count:
        hours = budget.window_s / 3600
        raise ConfigError(
            f"--validity {validity_s / 3600:g} h: agents renewing at {renew_at:.2f} of the "
            f"life renew every {every / 3600:.2f} h, {need} renewals per {hours:g} h with room "
            f"for a lost answer, over --renewal-budget {budget.count}/{hours:g}h ({ENV}): "
            f"the fleet would expire. Set --renewal-budget {need}/{hours:g}h or more, or a "
            f"longer --validity"
        )
