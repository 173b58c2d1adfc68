"""How many renewals one device gets per window, kept in its signed record in the store.

Import path and API (pure: a device's record in, the changed record out; ``Renewals`` applies
it inside the record's compare-and-swap)::

    from cloud_sync.renewal_budget import RenewalBudget, budget_from_env, spend, refusal
    budget = RenewalBudget(count=4, window_s=86400)     # or parse_budget("4/24h")
    refusal(doc, budget, now, request_id)    # ClaimRefused("renewal_budget"/"replayed") or None
    doc = spend(doc, budget, now, request_id)   # the spend stamped in; raises as refusal does

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
looser. A service whose clock runs ahead by d lets ``count`` through per ``window_s - d``. A
stamp more than a window ahead (a clock set years forward) is ignored with a WARNING rather
than locking the device out until that date: each service then still holds it to ``count``
per window of its own.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from cloud_sync.identity_claims import ClaimRefused
from cloud_sync.identity_records import DeviceIdentity, RenewalSpend
from modelpack.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "EDGEBENTO_RENEWAL_BUDGET"
DEFAULT = "4/24h"  # a device renews once per 60 days; 4 leaves room for lost answers
MAX_COUNT = 100  # each spend is kept in the record (~90 bytes): the record stays under its cap
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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
    kept = []
    for spent in doc.renewals:
        if spent.at > now + budget.window_s:
            log.warning(
                "%s: a renewal stamped %.0f s ahead of this clock is not counted (a service "
                "clock set forward)", doc.device, spent.at - now,
            )  # fmt: skip
        elif spent.at > now - budget.window_s:
            kept.append(spent)
    return kept


def refusal(
    doc: DeviceIdentity, budget: RenewalBudget, now: float, request_id: str | None
) -> ClaimRefused | None:
    """Why ``doc``'s device may not renew now (None: it may)."""
    counted = _counted(doc, budget, now)
    if request_id is not None and any(s.request == request_id for s in counted):
        return ClaimRefused("replayed", f"renewal request {request_id} was already answered")
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
    kept = [*_counted(doc, budget, now), RenewalSpend(at=now, request=request_id or "")]
    return doc.model_copy(update={"renewals": kept[-MAX_COUNT:]})
