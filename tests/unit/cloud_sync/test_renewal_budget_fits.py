"""``check_fits`` against certificates the fleet CA really issues and the budget's real
``refusal``: a validity it lets through keeps its promise, one lost answer per window costs no
refusal (or, where the certificate outlives a window and its last stretch after its renewal
point, a wait that ends before that stretch begins: from there the agent tries at its backoff's
pace, ``edge_agent.renewal_wait``).

The check before skipped the room for a lost answer as soon as the certificate outlived a
window: ``1/24h`` took validities from 79.04 h, where after one lost answer the budget freed
~0-68 s before the certificate ended, an hour into its last stretch.

The previous check took a renewal to come every (2/3 - 3 %) x the validity after the previous
one, but the CA sets ``not_valid_before`` up to 5 minutes before the moment of issue and the
agent renews at a share of the life counted from there: ~109 s sooner under 4/24h. Validities
from 12.566 h to 12.614 h passed the check, and a device whose answer was lost once was refused
``renewal_budget`` (for up to ~5 minutes) at a renewal the check said had room."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud_sync.fleet_ca import FleetCA, init_ca, new_key
from cloud_sync.identity_records import DeviceIdentity
from cloud_sync.renewal_budget import (
    AGENT_JITTER,
    AGENT_RENEW_AT,
    AGENT_REPLY_TIMEOUT_S,
    AGENT_RESERVE_MAX_S,
    AGENT_RESERVE_SHARE,
    AGENT_SPREAD_MAX_S,
    RenewalBudget,
    check_fits,
    refusal,
    spend,
)
from edge_agent.config import AgentConfig
from edge_agent.identity import REPLY_TIMEOUT_S, KeyMaker
from edge_agent.renewal_wait import (
    RENEW_JITTER,
    RESERVE_MAX_S,
    RESERVE_SHARE,
    reserve_s,
    spread_max_s,
)
from modelpack.errors import ConfigError

DAY = 86400.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetCA]:
    root = tmp_path_factory.mktemp("fits") / "ca"
    init_ca(root)
    yield FleetCA.load(root)


def _as_issued(ca: FleetCA, validity_s: float) -> tuple[float, float, float]:
    """(earliest renewal after issue, least life left at a renewal, the last stretch of the
    life that waits stay out of, with the spread they end by before it) of a certificate the
    CA issues now, read from the certificate as the agent reads it."""
    cert = ca.sign_device_csr(KeyMaker().csr(new_key(), "fit-a"), "fit-a", validity_s / DAY)
    issued = time.time()  # after the signature: the renewal counted from a later moment
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    life = not_after - not_before
    first = not_before + (AGENT_RENEW_AT - AGENT_JITTER) * life - issued
    left = not_after - (not_before + (AGENT_RENEW_AT + AGENT_JITTER) * life)
    reserve = reserve_s(not_before, not_after)
    return first, left, reserve + spread_max_s(reserve)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hours=st.floats(min_value=1.0, max_value=24 * 120.0),
    count=st.integers(min_value=1, max_value=12),
    lost_at=st.integers(min_value=0, max_value=12),
)
@example(hours=12.6, count=4, lost_at=3)  # in the gap the previous check left
@example(hours=12.61, count=4, lost_at=0)
@example(hours=80.0, count=1, lost_at=0)  # 79.04-82.68 h passed 1/24h with no room to wait
@example(hours=82.0, count=1, lost_at=0)
def test_a_validity_the_check_lets_through_survives_a_lost_answer_per_window(
    ca: FleetCA, hours: float, count: int, lost_at: int
) -> None:
    budget, validity = RenewalBudget(count, DAY), hours * 3600
    try:
        check_fits(budget, validity)
    except ConfigError:
        return  # refused: nothing promised
    first, left, last_stretch = _as_issued(ca, validity)
    # A device renewing at its earliest each time, one answer lost (asked again a second
    # later), over more than a window and the budget's count of renewals.
    doc, at = DeviceIdentity(device="fit-a"), 0.0
    asks = [f"r{k}" for k in range(math.ceil(DAY / first) + count + 2)]
    asks.insert(lost_at + 1, "retry")  # the one after the lost answer, a second later
    for request in asks:
        at += 1.0 if request == "retry" else first
        refused = refusal(doc, budget, at, request)
        if refused is not None:
            assert refused.retry_after_s is not None
            # Only where a refused device can wait: the budget frees before the certificate's
            # last stretch (from there the agent tries at its backoff's pace, and a wait it was
            # asked for ends up to a spread before it), the retry's second counted.
            assert refused.retry_after_s < left - last_stretch - 1.0, (hours, count, request)
            at += refused.retry_after_s
        doc = spend(doc, budget, at, request)


def test_the_gap_the_backdating_left_is_refused() -> None:
    """12.6 h passed the previous check under 4/24h; the boundary is now ~12.614 h."""
    with pytest.raises(ConfigError, match="--renewal-budget 5/24h"):
        check_fits(RenewalBudget(4, DAY), 12.6 * 3600)
    check_fits(RenewalBudget(4, DAY), 12.62 * 3600)
    check_fits(RenewalBudget(5, DAY), 12.6 * 3600)  # what the refusal asks for


def test_the_agents_figures_are_the_ones_the_check_assumes() -> None:
    """The check cannot import the agent (DESIGN.md): its copies must not drift."""
    assert AgentConfig.model_fields["renew_at"].default == AGENT_RENEW_AT
    assert RENEW_JITTER == AGENT_JITTER
    assert (RESERVE_SHARE, RESERVE_MAX_S) == (AGENT_RESERVE_SHARE, AGENT_RESERVE_MAX_S)
    assert spread_max_s(1e9) == AGENT_SPREAD_MAX_S and REPLY_TIMEOUT_S == AGENT_REPLY_TIMEOUT_S
    assert spread_max_s(100.0) == AGENT_RESERVE_SHARE * 100.0


def test_one_renewal_a_day_keeps_room_to_wait_for_it() -> None:
    """1/24h took 79.04 h and more; now only validities whose last stretch begins after the
    budget frees (~82.68 h)."""
    with pytest.raises(ConfigError, match="--renewal-budget 2/24h"):
        check_fits(RenewalBudget(1, DAY), 82.6 * 3600)
    check_fits(RenewalBudget(1, DAY), 82.7 * 3600)
