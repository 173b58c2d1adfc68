"""The device's buffered counting (``edge_agent.drift``: requests copied or held between folds,
folded thousands of rows at once) gives exactly the summaries of counting each request alone as
it arrives (``modelpack.monitor``: ``reduce_all`` then ``Binner.count``, request by request),
whatever the requests (NaN, infinities, values on an edge or out of the baseline's range, views,
other dtypes, a scalar output), the fold points, the telemetry reads between them and the window
boundaries; schema refusals count in the window of their time; and a telemetry thread reading
summaries while inference threads append loses and doubles nothing."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import drift_bins
from edge_agent.drift import DriftMonitor
from edge_agent.drift_bins import held_columns
from modelpack.baseline import Baseline, make_baseline, read_baseline
from modelpack.loader import load_pack
from modelpack.monitor import Binner, MonitorSpec, reduce, reduce_all
from modelpack.pack import Pack
from tests.support.agent import make_pack

WINDOW_S = 60.0
START = 1_800_000_000.0  # a window boundary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, mlp_model: Path) -> tuple[Pack, Baseline]:
    root = make_pack(tmp_path_factory.mktemp("drift") / "v1", mlp_model, None, 1)
    make_baseline(root, {"x": np.random.default_rng(0).standard_normal((1000, 8)).astype("f4")})
    baseline = read_baseline(root)
    assert baseline is not None
    return load_pack(root, trusted=(), allow_unsigned=True), baseline


@dataclass
class Reference:
    """Each request counted alone, in the window of its time."""

    baseline: Baseline
    windows: dict[float, dict[str, Any]] = field(default_factory=dict)

    def window(self, now: float) -> dict[str, Any]:
        start = math.floor(now / WINDOW_S) * WINDOW_S
        features = len(self.baseline.features)
        return self.windows.setdefault(
            start,
            {"rows": 0, "refused": {}, "nan": np.zeros(features, np.int64),
             "counts": None, "values": []},
        )  # fmt: skip

    def observe(self, now: float, feed: dict[str, Any], outputs: dict[str, Any], rows: int) -> None:
        specs = self.baseline.specs()
        matrix = np.concatenate(
            [
                reduce_all([s for s in specs if not s.output], feed, rows),
                reduce_all([s for s in specs if s.output], outputs, rows),
            ],
            axis=1,
        )
        counts, nan = Binner([f.edges for f in self.baseline.features]).count(matrix)
        window = self.window(now)
        window["rows"] += rows
        window["nan"] += nan
        window["counts"] = counts if window["counts"] is None else window["counts"] + counts
        window["values"].append(matrix)

    def refused(self, now: float, reason: str) -> None:
        refused = self.window(now)["refused"]
        refused[reason] = refused.get(reason, 0) + 1


values = st.one_of(
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e6, -1e6, 0.5, 1.0]),
    st.floats(-4, 4, width=32),
)


@st.composite
def events(draw: st.DrawFn, edges: list[float]) -> list[tuple[Any, ...]]:
    """Requests (of 1 to 5 rows, some a view, of another dtype, with a scalar output, or with
    values on an edge), clock ticks (some across a window boundary), telemetry reads and schema
    refusals, in any order."""
    value = st.one_of(values, st.sampled_from(edges))
    out: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["request"] * 6 + ["tick", "collect", "refused"]))
        if kind == "tick":
            out.append(("tick", draw(st.sampled_from([0.5, 20.0, 59.9, 60.0, 130.0]))))
        elif kind in ("collect", "refused"):
            out.append((kind, draw(st.sampled_from(["shape", "dtype"]))))
        else:
            rows = draw(st.integers(1, 5))
            x = np.asarray(draw(st.lists(value, min_size=rows * 8, max_size=rows * 8)), "f4")
            logits = np.asarray(draw(st.lists(value, min_size=rows * 3, max_size=rows * 3)), "f4")
            probs = np.asarray(draw(st.lists(value, min_size=rows * 3, max_size=rows * 3)), "f4")
            feed = {"x": x.reshape(rows, 8)}
            outputs = {"logits": logits.reshape(rows, 3), "probs": probs.reshape(rows, 3)}
            shape = draw(st.sampled_from(["plain"] * 4 + ["view", "float64", "scalar"]))
            if shape == "view":  # every other column of a wider array: not contiguous
                wide = np.zeros((rows, 16), np.float32)
                wide[:, ::2] = feed["x"]
                feed["x"] = wide[:, ::2]
            elif shape == "float64":
                feed["x"] = feed["x"].astype(np.float64)
            elif shape == "scalar":  # no row per request row: its features NaN
                outputs["probs"] = np.asarray(np.float32(0.5))
            out.append(("request", feed, outputs, rows))
    return out


def _short(value: float) -> float:
    return float(f"{value:.7g}") if math.isfinite(value) else 0.0


def _check(doc: dict[str, Any], want: dict[str, Any], baseline: Baseline) -> None:
    binner = Binner([f.edges for f in baseline.features])
    assert doc["rows"] == want["rows"]
    assert doc["refused"] == want["refused"]
    counts = binner.trim(want["counts"]) if want["counts"] is not None else None
    if not want["rows"]:
        assert doc["features"] == {}
        return
    matrix = np.concatenate(want["values"])
    for i, feature in enumerate(baseline.features):
        got = doc["features"][feature.name]
        assert got["c"] == counts[i], feature.name  # type: ignore[index]
        assert got["nan"] == int(want["nan"][i]), feature.name
        column = matrix[:, i]
        with np.errstate(invalid="ignore", over="ignore"):
            for key, terms in (("s", column), ("q", column * column)):
                total = float(np.nansum(terms))
                scale = float(np.nansum(np.abs(terms)))
                if not math.isfinite(total) or not math.isfinite(scale):
                    continue  # an infinity: sent as 0, or as what the order of sums gives
                assert abs(got[key] - _short(total)) <= 1e-6 * scale + 1e-30, (feature.name, key)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), fold_rows=st.sampled_from([1, 3, 7, 4096]))
def test_buffered_folds_give_the_summaries_of_counting_each_request_alone(
    tiny: tuple[Pack, Baseline], data: st.DataObject, fold_rows: int
) -> None:
    pack, baseline = tiny
    edges = sorted({e for f in baseline.features for e in f.edges})
    now = [START]
    fold_bytes = data.draw(st.sampled_from([64, 4 << 20]))
    monitor = DriftMonitor(lambda: pack, WINDOW_S, fold_rows, lambda: now[0], fold_bytes)
    reference = Reference(baseline)
    docs, want = play(monitor, reference, data.draw(events(edges)), now)
    for doc in docs:
        _check(doc, want[doc["window_start"]], baseline)


def play(
    monitor: DriftMonitor, reference: Reference, events: list[tuple[Any, ...]], now: list[float]
) -> tuple[list[dict[str, Any]], dict[float, dict[str, Any]]]:
    """The events given to the monitor and the reference: the monitor's summaries, each
    window once, and the reference's windows that have rows or refusals, by start."""
    docs: list[dict[str, Any]] = []
    served = False
    for event in events:
        if event[0] == "tick":
            now[0] += event[1]
        elif event[0] == "collect":
            docs.extend(monitor.collect())
        elif event[0] == "refused":
            monitor.refused(event[1])
            if served:  # a refusal before any answer has no version to count in
                reference.refused(now[0], event[1])
        else:
            _, feed, outputs, rows = event
            monitor.observe("tiny", "1", feed, outputs, rows)
            reference.observe(now[0], feed, outputs, rows)
            served = True
    docs.extend(monitor.collect(force=True))
    assert monitor.failures == 0
    starts = [doc["window_start"] for doc in docs]
    assert len(starts) == len(set(starts)), "a window summarised twice"
    want = {s: w for s, w in reference.windows.items() if w["rows"] or w["refused"]}
    assert sorted(starts) == sorted(want)
    return docs, want


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=8),
    st.sampled_from(["float32", "uint8", "float64"]),
    st.sampled_from([1, 2000, 1 << 19]),
    st.booleans(),
)
def test_images_reduced_in_chunks_give_each_images_own_features(
    rows: list[int], dtype: str, chunk: int, last: bool
) -> None:
    """Images joined and reduced a chunk at a time (``_IMAGE_CHUNK_BYTES``, here from one
    image a chunk to all at once): each row's features are those of ``reduce`` on that
    request alone, NaN kept."""
    rng = np.random.default_rng(sum(rows))
    spec = MonitorSpec("im", "image", (("channels", "last" if last else "first"),))
    requests = []
    for n in rows:
        image = (rng.random((n, 5, 6, 3) if last else (n, 3, 5, 6)) * 255).astype(dtype)
        if dtype != "uint8" and n == 2:
            image.flat[7] = np.nan
        requests.append(({"im": image}, n))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(drift_bins, "_IMAGE_CHUNK_BYTES", chunk)
        columns = held_columns([spec], requests)
    alone = np.concatenate([reduce(spec, t["im"]) for t, _ in requests])
    # The baseline's reducer's own floats (``monitor.image_stats``), bit for bit.
    np.testing.assert_array_equal(columns.T, alone)


def test_a_telemetry_thread_reading_while_threads_append_loses_and_doubles_nothing(
    tiny: tuple[Pack, Baseline],
) -> None:
    """Three inference threads observe requests while a telemetry thread moves the clock a
    window on and collects, again and again, with the interpreter switching threads every
    microsecond: every row is in exactly one summary, and the bins over all summaries are the
    bins of every request. (A request that found its window closed by ``collect`` between its
    clock reading and its count was dropped before the lock covered both.)"""
    pack, baseline = tiny
    now = [START]
    monitor = DriftMonitor(lambda: pack, WINDOW_S, 64, lambda: now[0])
    work = tiny_work(seed=5, requests=400)

    def advance() -> None:
        now[0] += WINDOW_S

    docs = observe_while_collecting(monitor, work, advance)
    reference = Reference(baseline)
    for requests in work:
        for feed, outputs, rows in requests:
            reference.observe(START, feed, outputs, rows)
    (want,) = reference.windows.values()
    totals = np.zeros_like(want["counts"])
    binner = Binner([f.edges for f in baseline.features])
    for doc in docs:
        for i, feature in enumerate(baseline.features):
            got = doc["features"][feature.name]["c"]
            totals[i, : len(got)] += got
    assert binner.trim(totals) == binner.trim(want["counts"])


@pytest.mark.parametrize("chunk", [1, 1 << 19])
def test_images_of_either_layout_are_reduced_as_each_alone(chunk: int) -> None:
    """Without a ``channels`` parameter each image's layout is read from its shape, chunk by
    chunk: channels-first and channels-last images in one fold give each image's own features
    (one chunk each, or joined apart by the reference when they cannot be joined)."""
    rng = np.random.default_rng(9)
    spec = MonitorSpec("im", "image")
    shapes = [(1, 3, 5, 6), (2, 6, 5, 3), (1, 3, 5, 6), (1, 6, 5, 3)]
    requests = [({"im": rng.random(shape).astype("f4")}, shape[0]) for shape in shapes]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(drift_bins, "_IMAGE_CHUNK_BYTES", chunk)
        columns = held_columns([spec], requests)
    alone = np.concatenate([reduce(spec, t["im"]) for t, _ in requests])
    # Rows may come grouped by shape from the reference path: compared in the order of their
    # channel means (numpy's own floats, bit for bit). The brightness, a matrix product, may
    # differ in its last bit with the number of rows multiplied at once, as ``reduce`` does.
    got, want = columns.T, alone
    got, want = got[np.lexsort(got[:, :-1].T)], want[np.lexsort(want[:, :-1].T)]
    np.testing.assert_array_equal(got, want)


Request = tuple[dict[str, Any], dict[str, Any], int]


def tiny_work(seed: int, requests: int, threads: int = 3) -> list[list[Request]]:
    """For each inference thread, ``requests`` of 1, 1 and 4 rows in turn for the tiny MLP."""
    rng = np.random.default_rng(seed)
    work = []
    for _ in range(threads):
        mine = []
        for i in range(requests):
            rows = [1, 1, 4][i % 3]
            x = rng.standard_normal((rows, 8)).astype(np.float32)
            probs = rng.dirichlet([1, 1, 1], rows).astype(np.float32)
            mine.append(({"x": x}, {"logits": x[:, :3].copy(), "probs": probs}, rows))
        work.append(mine)
    return work


def observe_while_collecting(
    monitor: DriftMonitor, work: list[list[Request]], advance: Callable[[], None]
) -> list[dict[str, Any]]:
    """A thread per list of ``work`` observes its requests while a telemetry thread calls
    ``advance`` and collects, again and again, the interpreter switching threads every
    microsecond; then the last window, forced. Checks what every such run must hold: no failure,
    no window summarised twice, every row in a summary."""
    done = threading.Event()
    docs: list[dict[str, Any]] = []

    def serve(requests: list[Request]) -> None:
        for feed, outputs, rows in requests:
            monitor.observe("tiny", "1", feed, outputs, rows)

    def telemetry() -> None:
        while not done.is_set():
            advance()
            docs.extend(monitor.collect())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        reader = threading.Thread(target=telemetry)
        pool = [threading.Thread(target=serve, args=(requests,)) for requests in work]
        reader.start()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        done.set()
        reader.join()
    finally:
        sys.setswitchinterval(interval)
    docs.extend(monitor.collect(force=True))
    assert monitor.failures == 0
    starts = [doc["window_start"] for doc in docs]
    assert len(starts) == len(set(starts)), "a window summarised twice"
    assert sum(doc["rows"] for doc in docs) == sum(r for w in work for _, _, r in w)
    return docs
