"""Budgeted sampling of the drift summaries on the device (``edge_agent.drift``): every row and
every schema refusal of a window counted exactly; the bins those of the requests the window's
draws chose, each request with the same probability, ``budget_rows`` over the rows of the
window before; with a probability of 1 (a budget never exceeded, or none) every request, which
is the exact fold of each request alone. And a sample keeps the shares of the bins."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.drift_stats import chi2_sf, chi2_statistic
from edge_agent.drift import DriftMonitor
from modelpack.baseline import Baseline, make_baseline, read_baseline
from modelpack.loader import load_pack
from modelpack.pack import Pack
from tests.support.agent import make_pack
from tests.unit.edge_agent.test_drift_buffered_vs_rows import (
    START,
    WINDOW_S,
    Reference,
    _check,
    events,
    observe_while_collecting,
    play,
    tiny_work,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, mlp_model: Path) -> tuple[Pack, Baseline]:
    root = make_pack(tmp_path_factory.mktemp("sampled") / "v1", mlp_model, None, 1)
    make_baseline(root, {"x": np.random.default_rng(0).standard_normal((1000, 8)).astype("f4")})
    baseline = read_baseline(root)
    assert baseline is not None
    return load_pack(root, trusted=(), allow_unsigned=True), baseline


class SampledReference(Reference):
    """Each request counted alone; binned when its own replay of the monitor's draws says so:
    the window's probability from the rows of the window before, a geometric gap of requests
    let pass drawn when a window opens and after each request binned."""

    def __init__(self, baseline: Baseline, budget: int, seed: int) -> None:
        super().__init__(baseline)
        self.budget, self.rng = budget, random.Random(seed)
        self.seen: dict[int, int] = {}
        self.binned: dict[float, int] = {}
        self.open: int | None = None
        self.p, self.gap = 1.0, 0

    def _gap(self) -> int:
        if self.p >= 1:
            return 0
        return int(math.log(1.0 - self.rng.random()) / math.log1p(-self.p))

    def enter(self, now: float) -> None:
        """The monitor opens a window at the first request (or refusal) of its time."""
        index = math.floor(now / WINDOW_S)
        if self.open != index:
            self.open = index
            before = self.seen.get(index - 1, 0)
            self.p = 1.0 if not self.budget or before <= self.budget else self.budget / before
            self.gap = self._gap()

    def refused(self, now: float, reason: str) -> None:
        self.enter(now)
        super().refused(now, reason)

    def observe(self, now: float, feed: dict[str, Any], outputs: dict[str, Any], rows: int) -> None:
        self.enter(now)
        index = math.floor(now / WINDOW_S)
        self.seen[index] = self.seen.get(index, 0) + rows
        start = index * WINDOW_S
        if self.gap:
            self.gap -= 1
            self.window(now)["rows"] += rows
            return
        self.gap = self._gap()
        self.binned[start] = self.binned.get(start, 0) + rows
        super().observe(now, feed, outputs, rows)


@st.composite
def windows(draw: st.DrawFn, edges: list[float]) -> list[tuple[Any, ...]]:
    """Up to four stretches of requests, telemetry reads and refusals (``events``, its own
    clock ticks left out), each followed by a tick to the next window, the one after it, or
    within the window; each request sent 1 to 8 times, so that the next window samples."""
    out: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 4))):
        for event in draw(events(edges)):
            if event[0] != "tick":
                out.extend([event] * (draw(st.integers(1, 8)) if event[0] == "request" else 1))
        out.append(("tick", draw(st.sampled_from([60.0, 60.0, 130.0, 20.0]))))
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), budget=st.sampled_from([0, 1, 1, 4, 12, 10**6]), seed=st.integers(0, 99))
def test_windows_bin_the_requests_their_draws_chose_and_every_request_at_a_probability_of_1(
    tiny: tuple[Pack, Baseline], data: st.DataObject, budget: int, seed: int
) -> None:
    """Whatever the requests, clock ticks, telemetry reads and refusals: each summary's rows and
    refusals are every request's, and its bins, NaN counts, sums and squares are the exact fold
    of the requests binned; with a budget of 0 or one no window reaches (10**6) that is every
    request, the summaries of counting each request alone (``test_drift_buffered_vs_rows``)."""
    pack, baseline = tiny
    edges = sorted({e for f in baseline.features for e in f.edges})
    now = [START]
    monitor = DriftMonitor(
        lambda: pack, WINDOW_S, 7, lambda: now[0], budget_rows=budget, rng=random.Random(seed)
    )
    reference = SampledReference(baseline, budget, seed)
    docs, want = play(monitor, reference, data.draw(windows(edges)), now)
    for doc in docs:
        start = doc["window_start"]
        binned = reference.binned.get(start, 0)
        assert doc["binned"] == binned <= doc["rows"] == want[start]["rows"]
        if budget in (0, 10**6):
            assert binned == doc["rows"]  # a probability of 1: every request binned
        if binned:
            _check(doc, want[start], baseline)
        else:  # every request let pass: counted, nothing binned
            assert doc["features"] == {} and doc["refused"] == want[start]["refused"]


def test_a_sample_keeps_the_shares_of_the_bins(tiny: tuple[Pack, Baseline]) -> None:
    """A window of 60,000 one-row requests binned in full, then the same rows shuffled in the
    next window at ``budget_rows`` over 60,000: about the budget binned, and the shares of
    its bins those of every row (chi-square test of homogeneity of the binned counts against
    every row's, p above 1e-4 for every feature; the seed is fixed, so the test is
    deterministic, and the bound is far from what the seed gives)."""
    pack, _ = tiny
    rng = np.random.default_rng(4)
    n, budget = 60_000, 3000
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x[:, 0] += np.where(rng.random(n) < 0.3, 2.0, 0.0)  # a lopsided mix: 30 % shifted up
    logits = np.tile(np.asarray([[0.1, 0.2, 0.7]], np.float32), (n, 1))
    now = [START]
    monitor = DriftMonitor(
        lambda: pack, WINDOW_S, 4096, lambda: now[0], budget_rows=budget, rng=random.Random(1)
    )
    for order in (np.arange(n), rng.permutation(n)):
        for i in order:
            row = slice(int(i), int(i) + 1)
            monitor.observe(
                "tiny", "1", {"x": x[row]}, {"logits": logits[row], "probs": logits[row]}, 1
            )
        now[0] += WINDOW_S
    full, sampled = monitor.collect(force=True)
    assert full["rows"] == full["binned"] == sampled["rows"] == n
    p = budget / n
    sd = math.sqrt(n * p * (1 - p))
    assert abs(sampled["binned"] - budget) < 5 * sd, sampled["binned"]
    for name, f in full["features"].items():
        every, some = np.asarray(f["c"], float), np.asarray(sampled["features"][name]["c"], float)
        if (every > 0).sum() < 2:
            continue  # one bin (a class never predicted otherwise): nothing to compare
        stat, df = chi2_statistic(every, some)
        assert chi2_sf(float(stat), int(df)) > 1e-4, (name, every, some)
        shares = every / every.sum()
        assert np.abs(some / some.sum() - shares).max() < 0.05, name


def test_threads_sampling_while_telemetry_collects_count_every_row_once(
    tiny: tuple[Pack, Baseline],
) -> None:
    """Three inference threads observe requests while a telemetry thread moves the clock a
    window on (once the window has 40 rows) and collects, with the interpreter switching threads
    every microsecond and a budget of 8 rows (every window after the first sampled): every row is in exactly one summary, and every
    summary's bins and NaN counts add up to the rows it binned (what the cloud checks)."""
    pack, _ = tiny
    now = [START]
    monitor = DriftMonitor(
        lambda: pack, WINDOW_S, 64, lambda: now[0], budget_rows=8, rng=random.Random(3)
    )
    work = tiny_work(seed=6, requests=300)

    def advance() -> None:
        window = monitor._window
        if window is not None and window.rows >= 40:  # so that the next window samples
            now[0] += WINDOW_S

    docs = observe_while_collecting(monitor, work, advance)
    assert any(doc["binned"] < doc["rows"] for doc in docs)  # sampled windows there were
    for doc in docs:
        for feature in doc["features"].values():
            assert sum(feature["c"]) + feature["nan"] == doc["binned"]
