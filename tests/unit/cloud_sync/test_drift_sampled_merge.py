"""Devices that bin a sample of their rows, at different rates, merged by the cloud
(``cloud_sync.drift``, ``drift_stats.Tally``): a cohort's shares are its devices' shares weighted
by the rows each answered (never by the rows each binned); at one rate the pooled counts are the
binned counts added up, as when every row was binned; a device cannot shrink the pool's
effective sample to hide the others' drift; and a fleet whose devices sample still alarms on a
shifted cohort and stays quiet on the others."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.drift import DriftOptions, Loaded, evaluate
from cloud_sync.drift_stats import Tally, pooled
from cloud_sync.drift_summary import DriftSummary
from modelpack.baseline import BASELINE_FILE, read_baseline
from tests.support.drift_sim import SimFleet, drift_pack, evaluate_summaries, mean_shift

device = st.tuples(
    st.lists(st.integers(0, 10_000), min_size=5, max_size=5).filter(lambda c: sum(c) > 0),
    st.integers(1, 1000),  # rows answered per row binned, at most
)


@settings(max_examples=200, deadline=None)
@given(st.lists(device, min_size=1, max_size=8), st.integers(1, 50))
def test_pooled_shares_weigh_each_device_by_the_rows_it_answered(
    devices: list[tuple[list[int], int]], common: int
) -> None:
    tallies, shares, answered = [], [], []
    for counts, ratio in devices:
        binned = sum(counts)
        rows = binned * ratio - (ratio > 1)  # not a whole multiple: any rows >= binned
        tallies.append(Tally.of(counts, rows, binned))
        shares.append(np.asarray(counts, float) / binned)
        answered.append(rows)
    pool = pooled(tallies).counts()
    want = sum(r * s for r, s in zip(answered, shares, strict=True)) / sum(answered)
    np.testing.assert_allclose(pool / pool.sum(), want, rtol=1e-9, atol=1e-12)
    binned_total = sum(sum(c) for c, _ in devices)
    assert pool.sum() <= binned_total * (1 + 1e-9)  # Kish: never more than the rows binned
    # One rate for every device (every row binned: ``common`` 1): the binned counts added up.
    same = pooled([Tally.of(c, sum(c) * common, sum(c)) for c, _ in devices]).counts()
    np.testing.assert_allclose(same, np.sum([c for c, _ in devices], axis=0), rtol=1e-9)
    # A device left out (``_carriers``): the pool less it is the pool of the others.
    if len(tallies) > 1:
        rest = (pooled(tallies) - tallies[0]).counts()
        np.testing.assert_allclose(rest, pooled(tallies[1:]).counts(), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return drift_pack(tmp_path_factory.mktemp("drift-sampled"))


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 40))
def test_at_one_rate_the_verdicts_and_figures_are_those_of_binning_every_row(
    pack, ratio: int
) -> None:  # type: ignore[no-untyped-def]
    """The same binned counts, every device claiming ``ratio`` times as many rows answered:
    the same figures and verdicts as binning every row (and as summaries without ``binned``,
    from devices before sampling)."""
    devices = [f"d-{j}" for j in range(5)]
    fleet = SimFleet(pack, {"g": devices}, seed=6)
    for shift in (0.0, 0.0, 0.5, 0.5):
        fleet.window({"g": mean_shift(2, shift)})
    members = {d: ["g"] for d in devices}
    old, scaled = [], []
    for d, s in fleet.summaries:
        doc = s.model_dump(mode="json")
        assert doc.pop("binned") == doc["rows"]
        old.append((d, DriftSummary.model_validate(doc)))
        doc |= {"rows": doc["rows"] * ratio, "binned": doc["rows"]}
        scaled.append((d, DriftSummary.model_validate(doc)))
    want = evaluate_summaries(pack, old, members)[("drifty", 1, "g")]
    got = evaluate_summaries(pack, scaled, members)[("drifty", 1, "g")]
    assert [w.verdict for w in want] == ["ok", "ok", "drift", "drift"]
    assert [(w.verdict, w.alarm, w.binned) for w in got] == [
        (w.verdict, w.alarm, w.binned) for w in want
    ]
    for a, b in zip(got, want, strict=True):
        assert a.rows == b.rows * ratio
        for fa, fb in zip(a.features, b.features, strict=True):
            assert fa.drift == fb.drift
            np.testing.assert_allclose([fa.psi, fa.js, fa.ks], [fb.psi, fb.js, fb.ks], rtol=1e-9)
            np.testing.assert_allclose(fa.p, fb.p, rtol=1e-6, atol=1e-300)


def test_a_device_claiming_a_tiny_sample_of_many_rows_cannot_hide_the_drift(pack) -> None:  # type: ignore[no-untyped-def]
    """Five devices shifted 0.5 sd, a sixth claiming under twice their rows answered but one
    row binned (of the baseline's middle): its weight rows / binned would shrink the pool's
    effective sample to a few rows and the drift would not show; it is left out in turn
    (its squared weights outweigh the others') and named, ``masked_by``."""
    devices = [f"d-{j}" for j in range(6)]
    fleet = SimFleet(pack, {"g": devices}, seed=4)
    for _ in range(3):
        fleet.window({"g": mean_shift(2, 0.5)})
    baseline = read_baseline(pack.root)
    assert baseline is not None
    lying = []
    for d, s in fleet.summaries:
        if d == "d-0":
            doc = s.model_dump(mode="json") | {"rows": 110, "binned": 1}
            for f in baseline.features:
                c = [0] * len(f.counts)
                c[len(c) // 2] = 1
                doc["features"][f.name] = {"c": c, "nan": 0, "s": 0.0, "q": 0.0}
            s = DriftSummary.model_validate(doc)
        lying.append((d, s))
    windows = evaluate_summaries(pack, lying, {d: ["g"] for d in devices})[("drifty", 1, "g")]
    assert [w.verdict for w in windows] == ["drift"] * 3
    assert all(w.masked_by == ("d-0",) for w in windows)
    assert [w.alarm for w in windows] == [False, True, True]


def test_a_fleet_that_samples_alarms_on_the_shifted_cohort_and_not_on_the_others(pack) -> None:  # type: ignore[no-untyped-def]
    """Two cohorts of 5 devices serving 2,000 rows a window each, binning 300 (a tenth of the
    requests from the second window on): the shifted cohort (0.5 sd on one input) alarms, the
    unshifted one stays quiet over 8 windows, and the windows say seen > binned."""
    cohorts = {"quiet": [f"q-{j}" for j in range(5)], "shifted": [f"s-{j}" for j in range(5)]}
    fleet = SimFleet(pack, cohorts, rows_per_device=2000, seed=8, budget_rows=300)
    for _ in range(8):
        fleet.window({"shifted": mean_shift(2, 0.5)})
    sampled = [s for _, s in fleet.summaries if s.binned_rows < s.rows]
    assert len(sampled) == 70  # every device's windows after the first
    assert all(100 < s.binned_rows < 600 for s in sampled)
    verdicts = fleet.verdicts(DriftOptions())
    assert "alarm" not in verdicts["quiet"] and "drift" not in verdicts["quiet"], verdicts
    assert verdicts["shifted"][1:] == ["alarm"] * 7, verdicts


def test_a_window_whose_requests_were_all_let_pass_counts_its_rows(pack) -> None:  # type: ignore[no-untyped-def]
    """A device's window with rows answered and none binned (every request let pass: no
    feature counted) is accepted, its rows in the cohort's, its bins none; before, the cloud
    refused it as inconsistent and lost its rows."""
    devices = [f"d-{j}" for j in range(3)]
    fleet = SimFleet(pack, {"g": devices}, rows_per_device=300, seed=9)
    fleet.window()
    summaries = list(fleet.summaries)
    doc = summaries[0][1].model_dump(mode="json") | {"rows": 700, "binned": 0, "features": {}}
    summaries[0] = (summaries[0][0], DriftSummary.model_validate(doc))
    loaded = Loaded(summaries, {})
    sha = pack.manifest.file(BASELINE_FILE).sha256
    results = evaluate(loaded, {("drifty", 1): (sha, read_baseline(pack.root))}, {})
    (window,) = results[("drifty", 1, "all")]
    assert loaded.rejected == {}
    assert (window.rows, window.binned, window.verdict) == (1300, 600, "ok")
    assert all(f.rows == 600 for f in window.features)
