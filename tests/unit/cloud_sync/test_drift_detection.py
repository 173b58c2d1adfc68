"""Drift by cohort on a simulated fleet: the agent's own summaries (DriftMonitor on a simulated
clock, the model run by ONNX Runtime), merged and judged by the cloud's code.

Three cohorts of ten devices, 60 rows per device per window (600 per cohort window):
an alarm (drift in 2 consecutive windows) for a 0.5 standard deviation mean shift on one
feature comes at the second window, for a 0.25 one within 4, for a class-balance shift within 3;
over 100 windows the unshifted cohorts raise no alarm (0 in 400 cohort-windows, seed fixed;
docs/monitoring.md states the measured figures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.drift import DriftOptions, Loaded, evaluate
from cloud_sync.drift_summary import DriftSummary
from tests.support.drift_sim import SimFleet, class_balance, drift_pack, first_alarm, mean_shift


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return drift_pack(tmp_path_factory.mktemp("drift"))


def cohorts(n: int = 3, size: int = 10) -> dict[str, list[str]]:
    return {f"g{i}": [f"d{i}-{j}" for j in range(size)] for i in range(n)}


def test_mean_shifts_are_found_in_the_shifted_cohort_only(pack) -> None:  # type: ignore[no-untyped-def]
    fleet = SimFleet(pack, cohorts())
    for _ in range(5):
        fleet.window()
    for _ in range(6):
        fleet.window({"g0": mean_shift(2, 0.25), "g1": mean_shift(2, 0.5)})
    verdicts = fleet.verdicts()
    assert "drift" not in verdicts["g0"][:5] + verdicts["g1"][:5]
    assert first_alarm(verdicts["g1"], after=5) == 2
    found = first_alarm(verdicts["g0"], after=5)
    assert found is not None and found <= 4, verdicts["g0"]
    assert set(verdicts["g2"]) == {"ok"}
    assert verdicts["all"][5:].count("alarm") >= 4  # the fleet as a whole moved too


def test_a_class_balance_shift_is_found(pack) -> None:  # type: ignore[no-untyped-def]
    fleet = SimFleet(pack, cohorts(2), seed=11)
    fleet.window()
    shift = class_balance(fleet.predictor, favoured=2, share=0.3)
    for _ in range(4):
        fleet.window({"g1": shift})
    verdicts = fleet.verdicts()
    found = first_alarm(verdicts["g1"], after=1)
    assert found is not None and found <= 3, verdicts["g1"]
    assert set(verdicts["g0"]) == {"ok"}


@pytest.mark.slow
def test_unshifted_cohorts_raise_no_alarm_in_100_windows(pack) -> None:  # type: ignore[no-untyped-def]
    fleet = SimFleet(pack, cohorts(), seed=3)
    for _ in range(100):
        fleet.window()
    verdicts = fleet.verdicts()
    alarms = {c: v.count("alarm") for c, v in verdicts.items()}
    assert all(len(v) == 100 for v in verdicts.values())
    assert alarms == {"all": 0, "g0": 0, "g1": 0, "g2": 0}


def test_one_lying_device_cannot_make_a_cohort_drift(pack) -> None:  # type: ignore[no-untyped-def]
    """A device claiming a whole window of extreme values, and rows past what it can serve:
    capped, named a suspect, and the cohort's verdict is at most local, never drift."""
    fleet = SimFleet(pack, cohorts(1), seed=5)
    fleet.window({"g0": mean_shift(0, 0.0)})
    honest = fleet.summaries
    liar_doc = honest[0][1].model_dump(mode="json")
    for name, f in liar_doc["features"].items():
        counts = [0] * len(f["c"])
        counts[-1] = 10**9  # everything above the baseline's range
        liar_doc["features"][name] = {"c": counts, "nan": 0, "s": 0.0, "q": 0.0}
    liar_doc["rows"] = liar_doc["binned"] = 10**9  # every row binned, it says
    liar = ("d0-0", DriftSummary.model_validate(liar_doc))
    loaded = Loaded([liar, *[s for s in honest if s[0] != "d0-0"]], {})
    from modelpack.baseline import BASELINE_FILE, read_baseline

    sha = pack.manifest.file(BASELINE_FILE).sha256
    options = DriftOptions(max_device_rate=10.0)  # 600 rows a window at most
    baseline = read_baseline(pack.root)
    results = evaluate(loaded, {("drifty", 1): (sha, baseline)}, {}, options)
    (window,) = results[("drifty", 1, "all")]
    assert window.suspects == ("d0-0",)
    assert window.verdict == "local"
    assert window.local_devices == ("d0-0",)


def test_summaries_that_do_not_add_up_or_name_another_baseline_are_refused(pack) -> None:  # type: ignore[no-untyped-def]
    fleet = SimFleet(pack, cohorts(1, 2))
    fleet.window()
    (a, sa), (b, sb) = fleet.summaries
    doc = sa.model_dump(mode="json")
    doc["rows"] += 5  # bins no longer add up to the rows claimed binned
    doc["binned"] += 5
    other = sb.model_dump(mode="json") | {"baseline": "0" * 64}
    from modelpack.baseline import BASELINE_FILE, read_baseline

    sha = pack.manifest.file(BASELINE_FILE).sha256
    loaded = Loaded(
        [(a, DriftSummary.model_validate(doc)), (b, DriftSummary.model_validate(other))], {}
    )
    results = evaluate(loaded, {("drifty", 1): (sha, read_baseline(pack.root))}, {})
    assert results == {}
    assert loaded.rejected == {"inconsistent": 1, "baseline_mismatch": 1}


def test_a_summary_is_small(pack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.drift_sim import summary_bytes

    fleet = SimFleet(pack, cohorts(1, 1))
    fleet.window()
    assert max(summary_bytes(fleet)) < 5000
