"""The shadow phase's verdict (``cloud_sync.rollout_shadow``): per device, bounded by what a
device can have run, and robust to any one device: a liar can neither carry a broken version
nor block a good one alone, and a device claiming more runs than possible counts for nothing."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import Status
from cloud_sync.rollout_shadow import ShadowPhase
from cloud_sync.shadow_figures import ShadowFigures, ShadowSettings, device_verdict, parse_duration
from modelpack.errors import ConfigError

SETTINGS = ShadowSettings(rate=10.0, min_samples=100, min_devices=2, agreement=0.99)


def figures(agree: float, samples: int = 200, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": "tiny", "version": 2},
        "state": "running",
        "metric": "top1",
        "samples": samples,
        "rows": samples,
        "agreeing": agree * samples,
        "max_abs": 0.1,
        "shadow_ms": samples * 1.0,
        "current_ms": samples * 1.0,
        **extra,
    }


def phase(reports: dict[str, dict[str, Any]], started_s_ago: float = 60.0) -> ShadowPhase:
    """A phase whose watch holds these statuses, started ``started_s_ago``."""
    statuses = {d: Status(device=d, state="online", shadow=doc) for d, doc in reports.items()}
    rollout = SimpleNamespace(
        watch=SimpleNamespace(statuses=statuses),
        state=SimpleNamespace(name="tiny", version=2, get=lambda _d: None),
    )
    p = ShadowPhase(rollout, SETTINGS)  # type: ignore[arg-type]
    p.started = dict.fromkeys(reports, time.monotonic() - started_s_ago)
    return p


def verdict(reports: dict[str, dict[str, Any]]) -> str:
    p = phase(reports)
    return p._judge(list(reports), time.monotonic())


def test_a_broken_version_fails_on_honest_devices_and_one_liar_does_not_carry_it() -> None:
    honest = {f"d{i}": figures(0.9) for i in range(4)}
    assert verdict(honest) == "fail"
    assert verdict({**honest, "liar": figures(1.0)}) == "fail"
    # Two devices only: the honest one cannot be outvoted, nor can the liar carry it.
    assert verdict({"d0": figures(0.9), "liar": figures(1.0)}) == "pending"


def test_a_good_version_passes_and_one_liar_does_not_block_it() -> None:
    honest = {f"d{i}": figures(1.0) for i in range(3)}
    assert verdict(honest) == "pass"
    assert verdict({**honest, "liar": figures(0.0)}) == "pass"


def test_runs_beyond_the_rate_asked_make_a_suspect_whose_figures_count_for_nothing() -> None:
    # 60 s at 10 runs/s (+5 s slack) is at most 651 runs: a million is a lie.
    reports = {f"d{i}": figures(1.0) for i in range(3)}
    reports["liar"] = figures(0.0, samples=1_000_000)
    p = phase(reports)
    assert p._judge(list(reports), time.monotonic()) == "pass"
    assert "liar" in p.suspects and "1000000 shadow runs" in p.suspects["liar"]
    assert "liar" not in p.verdicts


def test_figures_of_another_version_or_unparsable_ones_do_not_count() -> None:
    other = figures(1.0)
    other["model"] = {"name": "tiny", "version": 1}
    p = phase({"old": other, "bad": {"model": "x", "samples": -1}})
    assert p._judge(["old", "bad"], time.monotonic()) == "pending"
    assert p.verdicts == {} and "bad" in p.suspects


def test_too_few_runs_say_nothing_and_a_failed_install_fails_at_once() -> None:
    assert device_verdict(ShadowFigures(**figures(0.5, samples=99)), SETTINGS)[0] == "pending"
    failed = ShadowFigures(model={"name": "tiny", "version": 2}, state="failed", reason="sig")
    assert device_verdict(failed, SETTINGS) == ("fail", "failed: sig")


def test_latency_and_errors_fail_a_device_that_agrees() -> None:
    slow = ShadowFigures(**figures(1.0, shadow_ms=200 * 3.0))
    assert "latency x3.00" in device_verdict(slow, SETTINGS)[1]
    erring = ShadowFigures(**figures(1.0, errors=10))
    assert "error rate" in device_verdict(erring, SETTINGS)[1]


def test_more_agreeing_rows_than_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="agreeing"):
        ShadowFigures(**figures(1.0, agreeing=1000))


@settings(max_examples=200, deadline=None)
@given(
    honest=st.integers(3, 12),
    good=st.booleans(),
    liar=st.sampled_from(["pass", "fail", "absent"]),
)
def test_no_single_device_changes_a_clear_verdict(honest: int, good: bool, liar: str) -> None:
    reports = {f"d{i}": figures(1.0 if good else 0.9) for i in range(honest)}
    if liar != "absent":
        reports["liar"] = figures(1.0 if liar == "pass" else 0.5)
    assert verdict(reports) == ("pass" if good else "fail")


def test_durations() -> None:
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90
    assert parse_duration("45") == 45 and parse_duration("1h") == 3600
    for bad in ("", "m", "-1", "2d", "nan", "25h"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
