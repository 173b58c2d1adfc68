"""The drift hot path (``DriftMonitor.observe``: the streams' plan for the usual request, the
general path for the others) counts what the reference counts, from one thread or from four
at once: the agent answers MQTT, HTTP and pipeline requests on several threads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import drift_bins
from edge_agent.drift import DriftMonitor
from edge_agent.drift_bins import Bins
from edge_agent.drift_window import Window
from modelpack.baseline import make_baseline
from modelpack.loader import load_pack
from modelpack.monitor import Binner, MonitorSpec, reduce_batch
from modelpack.predictor import Predictor
from tests.support.agent import make_pack
from tests.support.drift_requests import EDGES, KINDS, request

SPECS = [
    MonitorSpec("x", "columns"),
    MonitorSpec("p", "classes", (("scores", "probs"),), output=True),
]


@st.composite
def arrivals(draw: st.DrawFn) -> list[tuple[dict[str, np.ndarray], int]]:
    """Runs of alike requests (the plan's case) broken by others: another row count, a view
    that is not contiguous, another dtype, an output without a row per request row."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        rows = draw(st.sampled_from([1, 1, 2, 16]))
        kind = draw(st.sampled_from(["plain"] * 4 + KINDS))
        out.extend(request(draw, rows, kind) for _ in range(draw(st.integers(1, 4))))
    return out


def _monitor(fold_rows: int) -> tuple[DriftMonitor, Window]:
    """A monitor whose open window counts ``SPECS`` in ``EDGES`` (no pack to read)."""
    monitor = DriftMonitor(lambda: None, 60.0, fold_rows=fold_rows, clock=lambda: 1.0)
    window = Window(
        "m", "1", "sha", None, Bins(EDGES), SPECS[:1], SPECS[1:], 0.0, 60.0,  # type: ignore[arg-type]
        drift_bins.Streams(SPECS, fold_rows, 1 << 20), fold_rows, 1 << 20,
    )  # fmt: skip
    monitor._window = window
    return monitor, window


@settings(max_examples=60, deadline=None)
@given(arrivals(), st.sampled_from([1, 7, 64]))
def test_the_hot_path_counts_what_the_reference_counts(
    batch: list[tuple[dict[str, np.ndarray], int]], fold_rows: int
) -> None:
    monitor, window = _monitor(fold_rows)
    for tensors, rows in batch:
        monitor.observe("m", "1", {"x": tensors["x"]}, {"p": tensors["p"]}, rows)
    window.fold()
    expected = reduce_batch(SPECS, batch)
    want_counts, want_nan = Binner(EDGES).count(expected)
    assert monitor.failures == 0
    assert window.counts is not None and window.nan is not None
    assert window.binner.trim(window.counts) == Binner(EDGES).trim(want_counts)
    assert window.nan.tolist() == want_nan.tolist()
    assert window.rows == sum(rows for _, rows in batch)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(window.sums, np.nansum(expected, axis=0), rtol=1e-9)


def _requests(predictor: Predictor, seed: int) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(300):
        rows = [1, 1, 1, 3, 16][i % 5]
        x = (rng.standard_normal((rows, 8)) * 2).astype(np.float32)
        if i % 37 == 0:
            x[0, 1] = np.nan  # counted apart, never in a bin
        feed = {"x": x.astype(np.float64) if i % 41 == 0 else x}
        out.append((feed, predictor.run({"x": x}), rows))
    return out


def test_four_threads_count_what_one_thread_counts(tmp_path: Path, mlp_model: Path) -> None:
    """Four threads observing at once, folding every 64 rows (folds and copies interleave):
    the window's rows, bins and NaN counts are those of the same requests from one thread."""
    root = make_pack(tmp_path / "v1", mlp_model, None, 1)
    make_baseline(root, {"x": np.random.default_rng(0).standard_normal((1000, 8)).astype("f4")})
    pack = load_pack(root, trusted=(), allow_unsigned=True)
    predictor = Predictor.from_pack(pack)
    work = [_requests(predictor, seed) for seed in range(4)]

    def summary(threads: int) -> dict[str, Any]:
        monitor = DriftMonitor(lambda: pack, 60.0, fold_rows=64, clock=lambda: 1_800_000_000.0)
        start = threading.Barrier(threads)

        def serve(requests: list[tuple[dict[str, Any], dict[str, Any], int]]) -> None:
            start.wait()
            for feed, outputs, rows in requests:
                monitor.observe("tiny", "1", feed, outputs, rows)

        if threads == 1:
            serve([r for requests in work for r in requests])
        else:
            pool = [threading.Thread(target=serve, args=(requests,)) for requests in work]
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)  # threads switch inside the hot path, not between calls
            try:
                for thread in pool:
                    thread.start()
                for thread in pool:
                    thread.join()
            finally:
                sys.setswitchinterval(interval)
        assert monitor.failures == 0
        (doc,) = monitor.collect(force=True)
        return doc

    one, four = summary(1), summary(4)
    assert four["rows"] == one["rows"] == sum(rows for r in work for _, _, rows in r)
    assert {k: (f["c"], f["nan"]) for k, f in four["features"].items()} == {
        k: (f["c"], f["nan"]) for k, f in one["features"].items()
    }
    assert one["features"]["x[1]"]["nan"] == 4 * 9  # one row of 9 requests per thread
    for name, feature in one["features"].items():
        np.testing.assert_allclose(four["features"][name]["s"], feature["s"], rtol=1e-6)
