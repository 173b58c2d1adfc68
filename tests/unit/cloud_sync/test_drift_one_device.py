"""No single device steers a cohort's drift verdict: a cohort of one drifting device is named
(``local``) and never alarms, and a device that floods its cohort with rows like the baseline's
cannot hide the drift the other devices show (it is left out and named, ``masked_by``)."""

from __future__ import annotations

import pytest

from cloud_sync.drift import DriftOptions
from cloud_sync.drift_summary import DriftSummary
from modelpack.baseline import read_baseline
from tests.support.drift_sim import SimFleet, drift_pack, evaluate_summaries, mean_shift


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return drift_pack(tmp_path_factory.mktemp("drift-one"))


def test_a_cohort_of_one_drifting_device_is_named_and_never_alarms(pack) -> None:  # type: ignore[no-untyped-def]
    cohorts = {"solo": ["s-0"], "crowd": [f"c-{j}" for j in range(5)]}
    fleet = SimFleet(pack, cohorts, rows_per_device=300, seed=2)
    for _ in range(6):
        fleet.window({"solo": mean_shift(2, 1.0), "crowd": mean_shift(2, 1.0)})
    verdicts = fleet.verdicts()
    assert verdicts["solo"] == ["local"] * 6  # a 1 sd shift, plain to see, carried by s-0 alone
    assert verdicts["crowd"][1:] == ["alarm"] * 5  # the same shift on five devices alarms


def test_a_flooding_device_cannot_hide_its_cohorts_drift(pack) -> None:  # type: ignore[no-untyped-def]
    devices = [f"d-{j}" for j in range(6)]
    fleet = SimFleet(pack, {"g": devices}, seed=4)
    for _ in range(3):
        fleet.window({"g": mean_shift(2, 0.5)})
    baseline = read_baseline(pack.root)
    assert baseline is not None
    # d-0 claims 100 times the baseline's own distribution each window: 500,000 rows, within
    # what a device may serve in a minute (10,000 a second), so it is not capped.
    flooded = []
    for device, summary in fleet.summaries:
        if device != "d-0":
            flooded.append((device, summary))
            continue
        doc = summary.model_dump(mode="json")
        doc["rows"] = doc["binned"] = 100 * sum(baseline.features[0].counts)
        doc["features"] = {
            f.name: {"c": [100 * c for c in f.counts], "nan": 0, "s": 0.0, "q": 0.0}
            for f in baseline.features
        }
        flooded.append((device, DriftSummary.model_validate(doc)))
    honest = evaluate_summaries(pack, fleet.summaries, {d: ["g"] for d in devices})[
        ("drifty", 1, "g")
    ]
    windows = evaluate_summaries(pack, flooded, {d: ["g"] for d in devices})[("drifty", 1, "g")]
    assert [w.alarm for w in honest] == [False, True, True]
    assert [w.verdict for w in windows] == ["drift"] * 3
    assert [w.alarm for w in windows] == [False, True, True]
    assert all(w.masked_by == ("d-0",) and w.devices == 5 for w in windows)
    assert DriftOptions().max_device_rate * 60 > windows[0].rows  # not a capped suspect
