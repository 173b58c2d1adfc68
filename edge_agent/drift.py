"""Drift summaries on the device: each answered request's monitored features counted in the
bins of the live pack's baseline, one summary per model version and window, into telemetry.

Every answered row and every schema refusal is counted; the bins count a sample of the requests
(``edge_agent.drift_window``), each request of a window binned with the same probability, set
from the rows of the window before so that a steady device bins about ``budget_rows`` rows a
window (``sampling``). A request let pass costs a counter and a test; a request binned only
copies its small watched tensors into a buffer per tensor (or holds big ones by reference,
``edge_agent.drift_bins``); reducing them to their features and counting those in the bins run
vectorised over thousands of rows at once, when ``fold_rows`` rows or ``fold_bytes`` bytes are
pending or a window closes (``benchmarks/bench_drift.py``, ``docs/monitoring.md``). A summary
leaves as a telemetry record of kind ``drift`` (``cloud_sync.drift_summary``), through the
outbox like every record: stored on disk, sent, deleted only when the ingestion acknowledged it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from modelpack.errors import InputError
from modelpack.hashing import sha256_file
from modelpack.manifest import BASELINE_FILE
from modelpack.pack import Pack
from modelpack.serving.core import Job, ServingCore

# The baseline, its reducers, the bins and windows that count rows in it and the summary's model
# are imported once a pack has a baseline: a device serving packs without one never holds them
# (tests/unit/edge_agent/test_footprint.py).
if TYPE_CHECKING:
    from edge_agent.drift_bins import Bins
    from edge_agent.drift_window import Window
    from modelpack.baseline import Baseline

log = logging.getLogger(__name__)

Record = Callable[[str, dict[str, Any]], None]
# Rows a window bins at most on a steady device: 20 times the monitor's minimum of 200 rows a
# window, and enough that the PSI of an unshifted sample of 16 bins stays near (16 - 1) / 4096,
# a fifth of the monitor's ``min_psi`` (docs/monitoring.md, "Sampling").
BUDGET_ROWS = 4096


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
        budget_rows: int = BUDGET_ROWS,
        rng: random.Random | None = None,
    ) -> None:
        self.current, self.window_s, self.clock = current, window_s, clock
        self.fold_rows, self.fold_bytes = fold_rows, fold_bytes
        self.budget_rows = budget_rows  # 0: every request binned
        self._draw = (rng or random.Random()).random
        # Rows answered per window index (every version's), of this window and the one before.
        self._seen: dict[int, int] = {}
        self._lock = threading.Lock()
        self._window: Window | None = None
        self._skip: tuple[str, str] | None = None  # a version without a (readable) baseline
        self._last: tuple[str, str] | None = None  # the version of the last window opened
        self._closed: list[dict[str, Any]] = []
        self._loaded: tuple[tuple[str, str], tuple[str, Baseline, Bins] | None] | None = None
        self.failures = 0

    def _start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    def _open(self, model: str, version: str, now: float) -> Window | None:
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
        from edge_agent.drift_bins import Streams
        from edge_agent.drift_window import Window

        sha, baseline, binner = found
        specs = baseline.specs()
        inputs, outputs = [s for s in specs if not s.output], [s for s in specs if s.output]
        start = self._start(now)
        window = Window(
            model,
            version,
            sha,
            baseline,
            binner,
            inputs,
            outputs,
            start,
            start + self.window_s,
            Streams([*inputs, *outputs], self.fold_rows, self.fold_bytes),
            self.fold_rows,
            self.fold_bytes,
            sample=self.sampling(math.floor(now / self.window_s)),
            draw=self._draw,
        )
        window.gap = window.next_gap()
        return window

    def sampling(self, index: int) -> float:
        """The probability of binning a request in window ``index``: ``budget_rows`` over the
        rows answered in the window before (by every version), 1 when that was within the
        budget or had none (the first window, after a pause). A jump in traffic costs one window
        binned in full at most; the next one is sampled at the new rate."""
        seen = self._seen.get(index - 1, 0)
        return 1.0 if not self.budget_rows or seen <= self.budget_rows else self.budget_rows / seen

    def _load(self, pack: Pack, model: str, version: str) -> tuple[str, Baseline, Bins] | None:
        entry = pack.manifest.file(BASELINE_FILE)
        if entry is None:
            return None
        from edge_agent.drift_bins import Bins
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
        """After a successful run: never raises (a fault here must not fail the request).

        A request outside the window's sample (``Window.gap``) is counted and let pass. The
        usual request binned (the live version's open window, shaped as the last one) is copied
        here through the streams' plan in one function: on a device this runs between two
        requests with the interpreter's caches cold, where each call and attribute read of the
        general path (``Window.add``) cost several times what it costs in a tight loop. An
        image (``Streams.hold_rows``) is held by reference, joined at the fold. The window and
        the clock are read under the lock: a request never meets a window that ``collect``
        has just closed (it counts in the next one), so none is lost."""
        try:
            with self._lock:
                window = self._window
                if (
                    window is None
                    or self.clock() >= window.end
                    or window.version != version
                    or window.model != model
                ):
                    window = self._current_window(model, version, self.clock())
                    if window is None:
                        return
                if window.gap:  # not in the sample: counted, not binned
                    window.gap -= 1
                    window.rows += rows
                    return
                if window.sample < 1.0:
                    window.gap = window.next_gap()
                streams = window.streams
                if rows == streams.plan_rows:
                    done = 0
                    for output, name, dtype, shape, extend in streams.plan:
                        array = (outputs if output else feed)[name]
                        if array.dtype is not dtype or array.shape != shape:
                            break
                        try:
                            extend(array)
                        except TypeError:  # not contiguous
                            break
                        done += 1
                    else:
                        window.rows += rows
                        window.binned += rows
                        streams.rows += rows
                        if streams.rows >= streams.fold_at:
                            window.fold()
                        return
                    streams.undo(done, feed, outputs)
                elif rows == streams.hold_rows:  # the usual request is held: an image
                    window.rows += rows
                    window.binned += rows
                    window.held.append((feed, outputs, rows))
                    window.held_rows += rows
                    window.held_bytes += streams.hold_bytes
                    if (
                        window.held_rows >= window.fold_rows
                        or window.held_bytes >= window.fold_bytes
                    ):
                        window.fold()
                    return
                window.add(feed, outputs, rows)
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.exception("drift summaries stopped counting a request")

    def _current_window(self, model: str, version: str, now: float) -> Window | None:
        """The window a request of this version counts in when it is not the open one (under
        the lock): the open one is closed when its time is up or another version is live."""
        window = self._window
        same = window is not None and window.model == model and window.version == version
        if same and now < window.end:  # type: ignore[union-attr]
            return window
        if self._skip == (model, version):
            return None
        self._close_locked(now, force=window is not None and not same)
        if self._window is None:
            self._window = self._open(model, version, now)
            self._last = (model, version)
        return self._window

    def refused(self, reason: str) -> None:
        """A request the live model refused for its schema (a 400), counted in the window of
        the time it was refused: the open one while it lasts, else the next one of the last
        version that answered (``_current_window``), while that version is live."""
        with self._lock:
            window, now = self._window, self.clock()
            if (window is None or now >= window.end) and self._last is not None:
                window = self._current_window(*self._last, now)
            if window is not None and (reason in window.refused or len(window.refused) < 16):
                window.refused[reason] = window.refused.get(reason, 0) + 1

    def _close_locked(self, now: float, force: bool = False) -> None:
        window = self._window
        if window is None or (not force and now < window.start + self.window_s):
            return
        self._window = None
        index = math.floor(window.start / self.window_s + 0.5)
        self._seen = {i: n for i, n in self._seen.items() if i >= index - 1}
        self._seen[index] = self._seen.get(index, 0) + window.rows
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


class RunTap(Protocol):
    """What the core offers each successful run to, beside the drift monitor: a shadow
    (``edge_agent.shadow.ShadowRunner``). Named here, where the core calls it, so that this
    module needs nothing of the shadow, which imports the inference and the updater built on it."""

    next_at: float  # time.monotonic() before which it wants no run: the core skips the offer

    def offer(
        self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], current_s: float
    ) -> None: ...


class DriftCore(ServingCore):
    """The agent's serving core with the drift and shadow hooks: every successful run (MQTT,
    HTTP and pipelines all run through ``run_sync``) is counted, and every schema refusal; while
    a shadow runs (``edge_agent.shadow``), it is offered the run's tensors and time."""

    drift: DriftMonitor | None = None
    shadow: RunTap | None = None

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
