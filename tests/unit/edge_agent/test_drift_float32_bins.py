"""Counting in float32 (``drift_bins.Bins.add`` with ``exact32``): float32 values compared with
the baseline's float64 edges rounded up to float32 land in exactly the bins float64 comparisons
give (``modelpack.monitor.Binner``), edges between two float32 numbers, beyond float32's range
and values on an edge's neighbours included; and a window compares in float32 only what its
tensors' dtypes make float32 (a float64 input between two float32 numbers keeps its bin)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import drift_bins
from edge_agent.drift_bins import Bins, float32_exact
from edge_agent.drift_window import Window
from modelpack.monitor import Binner, MonitorSpec, reduce, reduce_batch

F32 = np.float32
# Edges a float32 cannot hold: between two float32 numbers, past float32's largest, subnormal.
EDGE = st.one_of(
    st.floats(-4, 4, width=32).map(float),
    st.floats(-4, 4),
    st.sampled_from([1e300, -1e300, 3.4028235e38 * 1.0000001, 1e-320, -1e-320, 1 + 2**-30]),
)


def _near(edges: list[float]) -> list[float]:
    """Every float32 at or next to each edge: where rounding the edge the wrong way shows."""
    out: list[float] = []
    with np.errstate(over="ignore"):
        for e in edges:
            v = F32(e)
            out += [float(v), float(np.nextafter(v, F32(np.inf))), float(np.nextafter(v, F32(-1)))]
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(EDGE, min_size=1, max_size=12, unique=True), min_size=1, max_size=4),
    st.lists(
        st.one_of(st.floats(-5, 5, width=32), st.sampled_from([np.nan, np.inf, -np.inf])),
        max_size=40,
    ),
    st.integers(1, 2100),
)
def test_float32_values_land_in_the_bins_of_float64_comparisons(
    raw: list[list[float]], extra: list[float], rows: int
) -> None:
    edges = [sorted(e) for e in raw]
    pool = np.asarray(_near([e for f in edges for e in f]) + extra + [0.0], dtype=F32)
    rng = np.random.default_rng(rows)
    # float32 values held in a float64 matrix, as a fold builds it; rows past a 1,024 block
    # and a tail of another length
    columns = rng.choice(pool, size=(len(edges), rows)).astype(np.float64)
    bins = Bins(edges)
    counts = np.zeros((len(edges), bins.width), dtype=np.int64)
    nan, _, _ = bins.add(columns, counts, exact32=True)
    want, want_nan = Binner(edges).count(columns.T)
    assert bins.trim(counts) == Binner(edges).trim(want)
    assert nan.tolist() == want_nan.tolist()


def test_only_tensors_whose_features_are_float32_are_compared_in_float32() -> None:
    columns, probs = (
        MonitorSpec("x", "columns"),
        MonitorSpec("p", "classes", (("scores", "probs"),)),
    )
    assert float32_exact(columns, np.dtype("float32"), (3, 2))
    assert float32_exact(columns, np.dtype("uint8"), (3, 2))
    assert not float32_exact(columns, np.dtype("float64"), (3, 2))
    assert not float32_exact(columns, np.dtype("int32"), (3, 2))
    assert float32_exact(probs, np.dtype("float32"), (3, 5))
    assert not float32_exact(probs, np.dtype("float64"), (3, 5))
    logits = MonitorSpec("p", "classes", (("scores", "logits"),))
    assert not float32_exact(logits, np.dtype("float32"), (3, 5))  # a softmax in float64
    assert float32_exact(MonitorSpec("im", "image"), np.dtype("float64"), (1, 3, 4, 4))
    assert not float32_exact(MonitorSpec("t", "tokens"), np.dtype("int64"), (1, 8))


def test_a_float64_input_between_two_float32_numbers_keeps_its_bin() -> None:
    """Requests whose ``x`` is float64, just above an edge that float32 cannot hold (both round
    to 1.0): the window counts them in float64, at or above the edge, as the reference does;
    the same values sent as float32 (1.0) fall below it."""
    edge = 1 + 2**-30  # float32 cannot hold it: it rounds to 1.0
    edges = [[0.5, edge], [0.0, 1.0], [0.0, 0.5]]  # x, p's class, p's confidence
    specs = [
        MonitorSpec("x", "columns"),
        MonitorSpec("p", "classes", (("scores", "probs"),), output=True),
    ]
    bins = Bins(edges)
    window = Window(
        "m", "1", "sha", None, bins, specs[:1], specs[1:], 0.0, 60.0,  # type: ignore[arg-type]
        drift_bins.Streams(specs, 64, 1 << 20), 64, 1 << 20,
    )  # fmt: skip
    seen = []
    for dtype in ("float64", "float32"):
        for _ in range(3):
            x = np.full((4, 1), 1 + 2**-29, dtype=dtype)  # as float32: 1.0
            p = np.tile(np.asarray([[0.25, 0.75]], np.float32), (4, 1))
            window.add({"x": x}, {"p": p}, 4)
            seen.append(({"x": x, "p": p}, 4))
        window.fold()
    want, _ = Binner(edges).count(reduce_batch(specs, seen))
    assert window.counts is not None
    assert bins.trim(window.counts)[0] == Binner(edges).trim(want)[0] == [0, 12, 12]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, np.nan, np.inf, -np.inf]), min_size=8),
)
def test_a_few_classes_compared_a_class_at_a_time_give_reduces_class_and_confidence(
    classes: int, pool: list[float]
) -> None:
    """Ties (the first class wins), NaN (class and confidence NaN), infinities and signed
    zeros: ``_few_classes`` (up to ``_FEW_CLASSES``) and ``argmax`` past it give ``reduce``'s
    floats."""
    scores = np.resize(np.asarray(pool, np.float32), (len(pool), classes))
    spec = MonitorSpec("p", "classes", (("scores", "probs"),), output=True)
    got = drift_bins._reduced(spec, scores)
    np.testing.assert_array_equal(got, reduce(spec, scores).T)
