"""The device's vectorised counting (``edge_agent.drift``: one comparison of every value with
every edge, requests joined per tensor) gives exactly the bins, NaN counts, sums and squares of
the reference path (``modelpack.monitor``: ``reduce_batch`` then ``Binner.count``), whatever
the values (NaN, infinities, values on an edge) and however requests are shaped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import drift_bins
from edge_agent.drift import DriftMonitor
from edge_agent.drift_bins import Bins, held_columns
from modelpack.baseline import make_baseline, read_baseline
from modelpack.loader import load_pack
from modelpack.monitor import Binner, MonitorSpec, reduce, reduce_batch
from modelpack.predictor import Predictor
from tests.support.agent import make_pack
from tests.support.drift_requests import EDGES, KINDS, request, value

SPECS = [MonitorSpec("x", "columns"), MonitorSpec("p", "classes", (("scores", "probs"),))]


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[dict[str, np.ndarray], int]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(1, 5))
        x = np.asarray(draw(st.lists(value, min_size=rows * 2, max_size=rows * 2)), np.float32)
        probs = np.asarray(draw(st.lists(value, min_size=rows * 2, max_size=rows * 2)))
        out.append(({"x": x.reshape(rows, 2), "p": probs.reshape(rows, 2)}, rows))
    if draw(st.booleans()):  # a request shaped apart: the reference path's grouping
        out.append(({"x": np.zeros((2, 2), np.float32), "p": np.ones((2, 2))}, 2))
    return out


@settings(max_examples=200, deadline=None)
@given(requests())
def test_counts_nan_sums_and_squares_match_the_reference(
    batch: list[tuple[dict[str, np.ndarray], int]],
) -> None:
    expected = reduce_batch(SPECS, batch)
    want_counts, want_nan = Binner(EDGES).count(expected)

    columns = held_columns(SPECS, batch)
    bins = Bins(EDGES)
    counts = np.zeros((len(EDGES), bins.width), dtype=np.int64)
    nan, sums, squares = bins.add(columns, counts)

    assert bins.trim(counts) == Binner(EDGES).trim(want_counts)
    assert nan.tolist() == want_nan.tolist()
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(sums, np.nansum(expected, axis=0), rtol=1e-12)
        np.testing.assert_allclose(squares, np.nansum(expected * expected, axis=0), rtol=1e-12)


def test_a_wide_batch_is_counted_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than one comparison pass holds: every row still counted once."""
    monkeypatch.setattr(drift_bins, "_COMPARE_BYTES", 1000)  # passes of four blocks
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50_000, 2)).astype(np.float32)
    x[::7, 0] = np.nan
    probs = rng.dirichlet([1, 1], 50_000)
    batch = [({"x": x, "p": probs}, 50_000)]
    bins = Bins(EDGES)
    counts = np.zeros((len(EDGES), bins.width), dtype=np.int64)
    bins.add(held_columns(SPECS, batch), counts)
    want, _ = Binner(EDGES).count(reduce_batch(SPECS, batch))
    assert bins.trim(counts) == Binner(EDGES).trim(want)
    assert [sum(row) for row in bins.trim(counts)] == [50_000 - len(x[::7]), 50_000, 50_000, 50_000]


def test_requests_of_mixed_shapes_and_dtypes_sum_to_the_reference(
    tmp_path: Path, mlp_model: Path
) -> None:
    """Requests of varied rows, one wider than a fold, some of another dtype, folded each time
    ``fold_rows`` wait: the summary is the reference path's over every row."""
    root = make_pack(tmp_path / "v1", mlp_model, None, 1)
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    make_baseline(root, {"x": x})
    pack = load_pack(root, trusted=(), allow_unsigned=True)
    predictor = Predictor.from_pack(pack)
    monitor = DriftMonitor(lambda: pack, 60.0, fold_rows=300, clock=lambda: 1_800_000_000.0)
    rng = np.random.default_rng(3)
    seen = []
    for i in range(400):
        rows = 400 if i == 7 else int(rng.integers(1, 12))  # one wider than a fold
        feed = {"x": (rng.standard_normal((rows, 8)) * 2).astype(np.float32)}
        outputs = predictor.run(feed)
        if i % 9 == 0:  # another dtype: reduced in a group of its own
            feed = {"x": feed["x"].astype(np.float64)}
        monitor.observe("tiny", "1", feed, outputs, rows)
        seen.append(({**feed, **outputs}, rows))
    (summary,) = monitor.collect(force=True)
    baseline = read_baseline(root)
    assert baseline is not None
    specs = baseline.specs()
    binner = Binner([f.edges for f in baseline.features])
    matrix = np.concatenate(
        [
            reduce_batch([s for s in specs if not s.output], seen),
            reduce_batch([s for s in specs if s.output], seen),
        ],
        axis=1,
    )
    counts, _ = binner.count(matrix)
    want = binner.trim(counts)
    assert summary["rows"] == sum(rows for _, rows in seen)
    assert [summary["features"][f.name]["c"] for f in baseline.features] == want


@st.composite
def arrivals(draw: st.DrawFn) -> list[tuple[dict[str, np.ndarray], int]]:
    """Requests as the hot path sees them: mostly alike, some of other rows, some a view that
    is not contiguous, some of another dtype, some with an output of no row per request row."""
    out = []
    for _ in range(draw(st.integers(1, 40))):
        rows = draw(st.sampled_from([1, 1, 1, 3, 16]))
        out.append(request(draw, rows, draw(st.sampled_from(["plain"] * 5 + KINDS))))
    return out


@settings(max_examples=60, deadline=None)
@given(arrivals(), st.sampled_from([1, 5, 64]))
def test_the_streams_and_the_held_requests_count_what_the_reference_counts(
    batch: list[tuple[dict[str, np.ndarray], int]], fold_rows: int
) -> None:
    """Copied on arrival (``drift_bins.Streams``) or held by reference, folded every
    ``fold_rows``: the window's bins, NaN, sums and squares are the reference path's."""
    from edge_agent.drift_window import Window

    specs = [SPECS[0], MonitorSpec("p", "classes", (("scores", "probs"),), output=True)]
    bins = Bins(EDGES)
    window = Window(
        "m", "1", "sha", None, bins, specs[:1], specs[1:], 0.0, 60.0,  # type: ignore[arg-type]
        drift_bins.Streams(specs, fold_rows, 1 << 20), fold_rows, 1 << 20,
    )  # fmt: skip
    for tensors, rows in batch:
        window.add({"x": tensors["x"]}, {"p": tensors["p"]}, rows)
    window.fold()
    expected = reduce_batch(specs, batch)
    want_counts, want_nan = Binner(EDGES).count(expected)
    assert window.counts is not None and window.nan is not None
    assert bins.trim(window.counts) == Binner(EDGES).trim(want_counts)
    assert window.nan.tolist() == want_nan.tolist()
    assert window.rows == sum(rows for _, rows in batch)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(window.sums, np.nansum(expected, axis=0), rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=5),
    st.sampled_from(["float32", "uint8", "float64"]),
    st.sampled_from([1.0, 1e-6, 1e6]),
    st.booleans(),
)
def test_images_held_and_joined_give_the_baselines_own_features(
    rows: list[int], dtype: str, scale: float, channels_last: bool
) -> None:
    """Images joined as float32 and reduced in place on the device: bit for bit the features
    the baseline's reducer gives them (``monitor.image_stats`` through ``reduce``, one
    implementation for both sides), brightness included, NaN kept; and those are numpy's
    float64 per-channel mean and standard deviation to float32's precision."""
    rng = np.random.default_rng(len(rows))
    spec = MonitorSpec("im", "image", (("channels", "last" if channels_last else "first"),))
    requests = []
    for n in rows:
        image = rng.random((n, 5, 6, 3) if channels_last else (n, 3, 5, 6)) * scale * 255
        image = image.astype(dtype)
        if dtype != "uint8" and n == 2:
            image.flat[4] = np.nan
        requests.append(({"im": image}, n))
    columns = held_columns([spec], requests)
    joined = np.concatenate([t["im"] for t, _ in requests])
    np.testing.assert_array_equal(columns.T, reduce(spec, joined))
    joined = joined.astype(np.float32).astype(np.float64)
    if channels_last:
        joined = np.moveaxis(joined, -1, 1)
    pixels = joined.reshape(len(joined), 3, -1)
    mean, std = pixels.mean(axis=2), pixels.std(axis=2)
    want = np.column_stack(
        [np.stack([mean, std], axis=2).reshape(len(pixels), -1), mean @ [0.299, 0.587, 0.114]]
    )
    np.testing.assert_allclose(columns.T, want, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
