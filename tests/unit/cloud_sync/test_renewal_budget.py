"""cloud_sync.renewal_budget: the flag's and the environment's syntax, and the budget's bound
over any sequence of renewals, replays and clocks (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.identity_claims import ClaimRefused
from cloud_sync.identity_records import DeviceIdentity
from cloud_sync.renewal_budget import (
    DEFAULT,
    ENV,
    RenewalBudget,
    budget_from_env,
    parse_budget,
    refusal,
    spend,
)
from modelpack.errors import ConfigError

DAY = 86400.0


def test_budgets_parse_and_nonsense_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_budget("4/24h") == RenewalBudget(4, DAY)
    assert parse_budget(" 10 / 7d ") == RenewalBudget(10, 7 * DAY)
    assert parse_budget("2/30m") == RenewalBudget(2, 1800.0)
    for bad in ("", "4", "0/24h", "101/1d", "4/0h", "-1/1h", "4/24", "four/day", "4/24h;rm"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    monkeypatch.delenv(ENV, raising=False)
    assert budget_from_env() == parse_budget(DEFAULT) == RenewalBudget(4, DAY)
    monkeypatch.setenv(ENV, "7/1h")
    assert budget_from_env() == RenewalBudget(7, 3600.0)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 6),
    steps=st.lists(
        st.tuples(st.floats(0, 3 * DAY), st.integers(0, 5), st.floats(-DAY / 4, DAY / 4)),
        max_size=40,
    ),
)
def test_no_window_ever_holds_more_than_the_budget(
    count: int, steps: list[tuple[float, int, float]]
) -> None:
    """Renewals at increasing true times, some replaying an earlier request id, each answered
    by a service whose clock is off by up to a quarter window either way: at most ``count``
    spent in any half window of true time (a clock ahead of another by d lets ``count``
    through per window - d, and d is at most half a window here), and a replayed id never
    spends while its spend is in the window."""
    budget, doc, true_now = RenewalBudget(count, DAY), DeviceIdentity(device="cam-1"), 0.0
    spent_at: list[float] = []
    for gap, request, skew in steps:
        true_now += gap
        before = doc
        try:
            doc = spend(doc, budget, true_now + skew, f"r{request}")
        except ClaimRefused as exc:
            assert exc.reason in ("renewal_budget", "replayed")
            assert doc == before
            continue
        now = true_now + skew  # a replay of a spend still in its window spends nothing
        window = [s for s in before.renewals if now - DAY < s.at <= now + DAY]
        assert all(s.request != f"r{request}" for s in window)
        spent_at.append(true_now)
    for start in spent_at:
        inside = [t for t in spent_at if start <= t < start + DAY / 2]
        assert len(inside) <= count, (start, spent_at)


def test_a_stamp_far_ahead_does_not_lock_the_device_out() -> None:
    budget = RenewalBudget(1, DAY)
    ahead = spend(DeviceIdentity(device="cam-1"), budget, 10 * 365 * DAY, "a")  # clock years on
    assert refusal(ahead, budget, 1000.0, "b") is None
    # One a few hours ahead counts: a service whose clock runs behind is stricter.
    near = spend(DeviceIdentity(device="cam-1"), budget, 1000.0 + 3 * 3600, "a")
    refused = refusal(near, budget, 1000.0, "b")
    assert refused is not None and refused.reason == "renewal_budget"
    assert refused.retry_after_s is not None and refused.retry_after_s > DAY


def test_a_lowered_budget_says_when_one_is_really_free() -> None:
    doc, wide = DeviceIdentity(device="cam-1"), RenewalBudget(3, DAY)
    for at, request in ((0.0, "a"), (100.0, "b"), (200.0, "c")):
        doc = spend(doc, wide, at, request)
    refused = refusal(doc, RenewalBudget(2, DAY), 300.0, "d")  # two must leave, not one
    assert refused is not None and refused.retry_after_s == DAY + 100.0 - 300.0


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 5),
    clocks=st.lists(st.floats(-3 * DAY, 3 * DAY), min_size=1, max_size=2),
    steps=st.lists(
        st.tuples(st.floats(0, DAY / 2), st.integers(0, 1), st.integers(0, 5)), max_size=60
    ),
)
def test_services_whose_clocks_are_any_distance_apart_keep_the_documented_bound(
    count: int, clocks: list[float], steps: list[tuple[float, int, int]]
) -> None:
    """One or two services, each with its own clock off by any amount (more than a window
    apart included), answering renewals at increasing true times. Each service holds the
    device to ``count`` in any window of true time (so two let 2 x ``count`` through at most:
    a stamp too far ahead to count was dropped at the other's write, and 40 of 50 renewals got
    through a 4/24h budget); clocks d < a window apart hold it to ``count`` per window - d."""
    budget, doc, true_now = RenewalBudget(count, DAY), DeviceIdentity(device="cam-1"), 0.0
    spent: list[tuple[float, int]] = []
    for gap, which, request in steps:
        true_now += gap
        service = which % len(clocks)
        try:
            doc = spend(doc, budget, true_now + clocks[service], f"r{request}")
        except ClaimRefused as exc:
            assert exc.reason in ("renewal_budget", "replayed")
            continue
        spent.append((true_now, service))
    for start, _ in spent:
        for service in range(len(clocks)):
            own = [t for t, s in spent if s == service and start <= t < start + DAY]
            assert len(own) <= count, (start, service, spent)
        apart = max(clocks) - min(clocks)
        if apart < DAY:
            inside = [t for t, _ in spent if start <= t < start + DAY - apart]
            assert len(inside) <= count, (start, apart, spent)


def test_a_stamp_too_far_ahead_to_count_is_kept_for_the_service_that_wrote_it() -> None:
    budget, ahead, behind = RenewalBudget(1, DAY), 5 * DAY, 0.0  # clocks 5 days apart
    doc = spend(DeviceIdentity(device="cam-1"), budget, ahead, "a")
    doc = spend(doc, budget, behind, "b")  # the service behind does not count "a"...
    assert [s.request for s in doc.renewals] == ["a", "b"]  # ...but keeps it
    for clock, request in ((ahead + 60, "c"), (behind + 60, "d")):
        refused = refusal(doc, budget, clock, request)  # each still holds its own spend
        assert refused is not None and refused.reason == "renewal_budget"


def test_a_budget_that_would_let_short_certificates_expire_is_refused() -> None:
    from cloud_sync.renewal_budget import check_fits

    check_fits(RenewalBudget(4, DAY), 90 * DAY)  # the defaults
    check_fits(RenewalBudget(100, 3600.0), 75.0)  # the demo's
    check_fits(RenewalBudget(2, 3600.0), 90 * DAY)
    for budget, validity in (
        (RenewalBudget(4, DAY), 9 * 3600.0),
        (RenewalBudget(4, DAY), 12 * 3600.0),
    ):
        with pytest.raises(ConfigError, match="--renewal-budget"):
            check_fits(budget, validity)
    check_fits(RenewalBudget(8, DAY), 6 * 3600.0)  # what the refusal asks for


def test_a_replayed_request_id_is_shown_escaped() -> None:
    """The request id is the device's: a newline or an escape in it must not forge a log
    line or reach a terminal raw (previous code echoed it as it came)."""
    budget, forged = RenewalBudget(4, DAY), "r1\nWARNING forged line \x1b[31m"
    doc = spend(DeviceIdentity(device="cam-1"), budget, 1000.0, forged)
    refused = refusal(doc, budget, 1001.0, forged)
    assert refused is not None and refused.reason == "replayed"
    assert str(refused).isprintable() and repr(forged) in str(refused)


def test_stamps_too_far_ahead_cost_one_warning_a_check(caplog: pytest.LogCaptureFixture) -> None:
    """A service behind keeps another's stamps it cannot count (up to 100): it logged a
    WARNING for each at every check, a hundred lines a second under a thief's renewals."""
    budget = RenewalBudget(50, DAY)
    doc = DeviceIdentity(device="cam-1")
    for i in range(50):
        doc = spend(doc, budget, 5 * DAY + i, f"r{i}")
    caplog.clear()
    with caplog.at_level("WARNING", logger="cloud_sync.renewal_budget"):
        refusal(doc, budget, 0.0, "x")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "50 renewal(s) stamped" in lines[0], lines
