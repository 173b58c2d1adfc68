"""Drift summaries on the device: each answered request's monitored features counted in the
bins of the live pack's baseline, one summary per model version and window, into telemetry.

The hot path only appends the request's tensors (by reference) to a list; reducing them to their
features and counting those in the bins run vectorised over hundreds of requests at once, when
``fold_rows`` rows or ``fold_bytes`` bytes are pending or a window closes, so a
request pays a few microseconds (``benchmarks/bench_drift.py``). A summary leaves as a telemetry
record of kind ``drift`` (``cloud_sync.drift_summary``), through the outbox like every record:
stored on disk, sent, deleted only when the ingestion acknowledged it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpack.errors import InputError
from modelpack.hashing import sha256_file
from modelpack.manifest import BASELINE_FILE
from modelpack.pack import Pack
from modelpack.serving.core import Job, ServingCore

# The baseline, its reducers and the summary's model are imported once a pack has a baseline:
# a device serving packs without one never holds them (tests/unit/edge_agent/test_footprint.py).
if TYPE_CHECKING:
    from edge_agent.shadow import ShadowRunner
    from modelpack.baseline import Baseline
    from modelpack.monitor import MonitorSpec

log = logging.getLogger(__name__)

Record = Callable[[str, dict[str, Any]], None]


@dataclass
class _Window:
    """One model version's counts in one window."""

    model: str
    version: str
    sha256: str
    baseline: Baseline
    binner: Bins
    inputs: list[MonitorSpec]
    outputs: list[MonitorSpec]
    start: float
    rows: int = 0
    # Answered requests not counted yet: their tensors, by reference (never changed after the
    # answer), reduced and counted together once ``fold_rows`` rows or ``fold_bytes`` wait.
    pending: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]] = field(
        default_factory=list
    )
    pending_rows: int = 0
    pending_bytes: int = 0
    counts: np.ndarray | None = None
    nan: np.ndarray | None = None
    sums: np.ndarray | None = None
    squares: np.ndarray | None = None
    refused: dict[str, int] = field(default_factory=dict)

    def fold(self) -> None:
        if not self.pending:
            return
        pending = self.pending
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        columns = np.concatenate(
            [
                _columns(self.inputs, [(feed, rows) for feed, _, rows in pending]),
                _columns(self.outputs, [(out, rows) for _, out, rows in pending]),
            ]
        )
        if self.counts is None:
            features = len(columns)
            self.counts = np.zeros((features, self.binner.width), dtype=np.int64)
            self.nan = np.zeros(features, dtype=np.int64)
            self.sums, self.squares = np.zeros(features), np.zeros(features)
        nan, sums, squares = self.binner.add(columns, self.counts)
        self.nan += nan  # type: ignore[operator]
        self.sums += sums  # type: ignore[operator]
        self.squares += squares  # type: ignore[operator]

    def summary(self, window_s: float) -> dict[str, Any]:
        self.fold()
        features = {}
        if self.counts is not None:
            bins = self.binner.trim(self.counts)
            for i, feature in enumerate(self.baseline.features):
                features[feature.name] = {
                    "c": bins[i],
                    "nan": int(self.nan[i]),  # type: ignore[index]
                    "s": _short(float(self.sums[i])),  # type: ignore[index]
                    "q": _short(float(self.squares[i])),  # type: ignore[index]
                }
        doc = {
            "model": self.model,
            "version": int(self.version),
            "baseline": self.sha256,
            "window_start": self.start,
            "window_s": window_s,
            "rows": self.rows,
            "refused": dict(list(self.refused.items())[:16]),
            "features": features,
        }
        from cloud_sync.drift_summary import DriftSummary

        return DriftSummary.model_validate(doc).model_dump(mode="json")


# Bytes of comparisons one pass of ``Bins.add`` may hold: bounds its memory for a wide pack.
_COMPARE_BYTES = 4 << 20


class Bins:
    """Counts many features at once in their baseline's bins, in place, with the bins of
    ``modelpack.monitor.Binner`` (bin 0 below the first edge, bin ``j`` in ``[e_{j-1}, e_j)``,
    the last at or above the last edge, NaN apart).

    A binary search per value (``searchsorted``) costs tens of nanoseconds a value, for its
    unpredictable branches; comparing every value with every edge at once is branch-free and
    vectorised: the count at or above each edge, and a bin is the difference of two of those.
    """

    def __init__(self, edges: list[list[float]]) -> None:
        self.edges = edges
        self.sizes = np.asarray([len(e) for e in edges], dtype=np.intp)
        widest = max((len(e) for e in edges), default=1)
        # NaN padding: no value is at or above it, so a feature's last own bin keeps +inf.
        self._padded = np.full((len(edges), widest, 1), np.nan)
        for i, e in enumerate(edges):
            self._padded[i, : len(e), 0] = e
        self.width = widest + 1

    def add(
        self, columns: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Adds a (features, rows) matrix's values to ``counts``; returns NaN per feature, sums
        and sums of squares (NaN left out)."""
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the sum is NaN, sent as 0
            sums = columns.sum(axis=1)
            if np.isfinite(sums).all():  # the common case: no NaN, one pass finds it
                nan = np.zeros(len(columns), dtype=np.int64)
                squares = np.einsum("ij,ij->i", columns, columns)
            else:
                nan = np.isnan(columns).sum(axis=1)
                sums, squares = np.nansum(columns, axis=1), np.nansum(columns * columns, axis=1)
        rows = columns.shape[1]
        step = max(256, _COMPARE_BYTES // max(1, self._padded.size))
        at_or_above = np.zeros(self._padded.shape[:2], dtype=np.int64)
        for start in range(0, rows, step):
            chunk = columns[:, None, start : start + step] >= self._padded
            at_or_above += np.add.reduce(chunk, axis=2, dtype=np.int64)
        valid = (rows - nan)[:, None]
        ladder = np.concatenate([valid, at_or_above, np.zeros_like(valid)], axis=1)
        counts += ladder[:, :-1] - ladder[:, 1:]
        return nan, sums, squares

    def trim(self, counts: np.ndarray) -> list[list[int]]:
        """Each feature's own bins (the padding's always-empty bins left out)."""
        return [[int(c) for c in counts[i, : n + 1]] for i, n in enumerate(self.sizes)]


def _columns(
    specs: list[MonitorSpec], requests: list[tuple[Mapping[str, np.ndarray], int]]
) -> np.ndarray:
    """The monitored features of many requests as a (features, rows) float64 matrix, in spec
    order. Requests whose tensors share their shapes past the rows (the common case) are joined
    with one ``concatenate`` per tensor and reduced at once; others go through ``reduce_batch``."""
    watched = [s for s in specs if s.reducer != "none"]
    if not watched:
        return np.empty((0, sum(rows for _, rows in requests)))
    from modelpack.monitor import reduce_batch

    rows = 0
    for _, n in requests:
        rows += n
    blocks = []
    for spec in watched:
        try:
            joined = np.concatenate([tensors[spec.tensor] for tensors, _ in requests])
        except ValueError:  # shapes differ past the rows, or a scalar
            joined = None
        if joined is None or joined.ndim == 0 or len(joined) != rows:
            return np.ascontiguousarray(reduce_batch(specs, requests).T)
        blocks.append(_reduced(spec, joined))
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _reduced(spec: MonitorSpec, joined: np.ndarray) -> np.ndarray:
    """``reduce``'s features, transposed, without its float64 copy of a wide tensor for the
    two reducers most packs use."""
    if spec.reducer == "columns" and joined.ndim >= 2:
        return joined.reshape(len(joined), -1).T.astype(np.float64)
    if spec.reducer == "classes" and joined.ndim == 2 and spec.param("scores", "") == "probs":
        top = np.argmax(joined, axis=1)
        # argmax stops at a row's first NaN, so the score it picks is NaN iff the row has one
        confidence = joined[np.arange(len(joined)), top].astype(np.float64)
        out = np.stack([top.astype(np.float64), confidence])
        out[0, np.isnan(confidence)] = np.nan
        return out
    from modelpack.monitor import reduce

    return np.ascontiguousarray(reduce(spec, joined).T)


def _short(value: float) -> float:
    """Seven significant digits: a mean and std to 1e-7 relative, and half the bytes."""
    return float(f"{value:.7g}") if math.isfinite(value) else 0.0


class DriftMonitor:
    """Observes answered requests (``observe``) and refused ones (``refused``); ``collect``
    hands the summaries of closed windows to the outbox."""

    def __init__(
        self,
        current: Callable[[], Pack | None],
        window_s: float = 60.0,
        fold_rows: int = 4096,
        clock: Callable[[], float] = time.time,
        fold_bytes: int = 4 << 20,
    ) -> None:
        self.current, self.window_s, self.clock = current, window_s, clock
        self.fold_rows, self.fold_bytes = fold_rows, fold_bytes
        self._lock = threading.Lock()
        self._window: _Window | None = None
        self._skip: tuple[str, str] | None = None  # a version without a (readable) baseline
        self._closed: list[dict[str, Any]] = []
        self._loaded: tuple[tuple[str, str], tuple[str, Baseline, Bins] | None] | None = None
        self.failures = 0

    def _start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    def _open(self, model: str, version: str, now: float) -> _Window | None:
        """The window of a version now live: its baseline read once from the verified pack."""
        if self._loaded is None or self._loaded[0] != (model, version):
            pack = self.current()
            if pack is None or (pack.manifest.name, str(pack.manifest.version)) != (model, version):
                return None  # the updater has not recorded the new pack yet: ask again later
            self._loaded = ((model, version), self._load(pack, model, version))
            self._skip = None if self._loaded[1] is not None else (model, version)
        found = self._loaded[1]
        if found is None:
            return None
        sha, baseline, binner = found
        specs = baseline.specs()
        return _Window(
            model,
            version,
            sha,
            baseline,
            binner,
            [s for s in specs if not s.output],
            [s for s in specs if s.output],
            self._start(now),
        )

    def _load(self, pack: Pack, model: str, version: str) -> tuple[str, Baseline, Bins] | None:
        entry = pack.manifest.file(BASELINE_FILE)
        if entry is None:
            return None
        from modelpack.baseline import read_baseline

        if sha256_file(pack.root / BASELINE_FILE) != entry.sha256:  # changed since verified
            log.warning(
                "%s of %s v%s does not match its manifest: no drift summaries",
                BASELINE_FILE,
                model,
                version,
            )
            return None
        baseline = read_baseline(pack.root)
        assert baseline is not None
        return entry.sha256, baseline, Bins([f.edges for f in baseline.features])

    def observe(
        self,
        model: str,
        version: str,
        feed: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        rows: int,
    ) -> None:
        """After a successful run: never raises (a fault here must not fail the request)."""
        try:
            self._observe(model, version, feed, outputs, rows)
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.exception("drift summaries stopped counting a request")

    def _current_window(self, model: str, version: str, now: float) -> _Window | None:
        window = self._window
        same = window is not None and (window.model, window.version) == (model, version)
        if same and now < window.start + self.window_s:  # type: ignore[union-attr]
            return window
        if self._skip == (model, version):
            return None
        with self._lock:
            self._close_locked(now, force=window is not None and not same)
            if self._window is None:
                self._window = self._open(model, version, now)
            return self._window

    def _observe(
        self,
        model: str,
        version: str,
        feed: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        rows: int,
    ) -> None:
        window = self._current_window(model, version, self.clock())
        if window is None:
            return
        size = 0
        for array in feed.values():
            size += array.nbytes
        with self._lock:
            if self._window is not window:
                return  # closed meanwhile: counted in the next one by the next request
            window.pending.append((feed, outputs, rows))
            window.rows += rows
            window.pending_rows += rows
            window.pending_bytes += size
            if window.pending_rows >= self.fold_rows or window.pending_bytes >= self.fold_bytes:
                window.fold()

    def refused(self, reason: str) -> None:
        """A request the live model refused for its schema (a 400), counted in its window."""
        with self._lock:
            window = self._window
            if window is not None and (reason in window.refused or len(window.refused) < 16):
                window.refused[reason] = window.refused.get(reason, 0) + 1

    def _close_locked(self, now: float, force: bool = False) -> None:
        window = self._window
        if window is None or (not force and now < window.start + self.window_s):
            return
        self._window = None
        if window.rows or window.refused:
            self._closed.append(window.summary(self.window_s))

    def collect(self, now: float | None = None, force: bool = False) -> list[dict[str, Any]]:
        """The summaries of windows that ended by ``now`` (all of them with ``force``: at stop)."""
        with self._lock:
            self._close_locked(self.clock() if now is None else now, force)
            closed, self._closed = self._closed, []
        return closed

    def flush_to(self, record: Record, force: bool = False) -> int:
        summaries = self.collect(force=force)
        if summaries:
            from cloud_sync.drift_summary import KIND

            for summary in summaries:
                record(KIND, summary)
        return len(summaries)


class DriftCore(ServingCore):
    """The agent's serving core with the drift and shadow hooks: every successful run (MQTT,
    HTTP and pipelines all run through ``run_sync``) is counted, and every schema refusal; while
    a shadow runs (``edge_agent.shadow``), it is offered the run's tensors and time."""

    drift: DriftMonitor | None = None
    shadow: ShadowRunner | None = None

    def run_sync(self, job: Job) -> Job:
        shadow = self.shadow
        if shadow is not None and shadow.next_at <= time.monotonic():  # rarely: rate-limited
            start = time.perf_counter()
            job = super().run_sync(job)
            shadow.offer(job.feed, job.outputs, time.perf_counter() - start)
        else:
            job = super().run_sync(job)
        monitor = self.drift
        if monitor is not None:
            model = job.model
            monitor.observe(model.name, model.version, job.feed, job.outputs, job.rows)
        return job

    def count_error(self, exc: BaseException) -> None:
        super().count_error(exc)
        monitor = self.drift
        if monitor is not None and isinstance(exc, InputError):
            monitor.refused(exc.reason)
