"""One model version's window of drift summaries on the device (``edge_agent.drift``).

Every answered row is counted (``rows``, exact), every schema refusal too; the bins, NaN counts,
sums and squares are those of a sample of the requests, each request binned with the same
probability ``sample`` in the window (independent draws: ``next_gap``), so the bins' shares
estimate the shares of every row the window answered, without bias. ``DriftMonitor`` sets the
probability from the rows of the window before (``budget_rows`` over them), so a steady device
bins about ``budget_rows`` rows a window (``docs/monitoring.md``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.drift_bins import Bins, Streams, float32_exact, held_columns, stream_columns

if TYPE_CHECKING:
    from modelpack.baseline import Baseline
    from modelpack.monitor import MonitorSpec


@dataclass(slots=True)  # slots: the hot path reads its fields on every request
class Window:
    """One model version's counts in one window: every answered row counted (``rows``), the
    rows of a sample of the requests binned (``binned``, the module's docstring)."""

    model: str
    version: str
    sha256: str
    baseline: Baseline
    binner: Bins
    inputs: list[MonitorSpec]
    outputs: list[MonitorSpec]
    start: float
    end: float
    streams: Streams
    fold_rows: int
    fold_bytes: int
    rows: int = 0  # every row answered in the window (seen), exact
    # Each request is binned with probability ``sample`` (``DriftMonitor.sampling``); ``gap``
    # is the number of requests to let pass before the next one binned (``next_gap``).
    sample: float = 1.0
    gap: int = 0
    binned: int = 0
    draw: Callable[[], float] = random.random
    # Answered requests that do not fit the streams (``drift_bins``): their tensors, by
    # reference (never changed after the answer), joined at the fold.
    held: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]] = field(
        default_factory=list
    )
    held_rows: int = 0
    held_bytes: int = 0
    counts: np.ndarray | None = None
    nan: np.ndarray | None = None
    sums: np.ndarray | None = None
    squares: np.ndarray | None = None
    refused: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        feed: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        rows: int,
    ) -> None:
        """One answered request binned, counted at the next fold (now when enough waits)."""
        self.rows += rows
        self.binned += rows
        streams = self.streams
        if streams.take(feed, outputs, rows):
            if streams.rows >= streams.fold_at:
                self.fold()
            return
        self.held.append((feed, outputs, rows))
        self.held_rows += rows
        size = sum(array.nbytes for array in (*feed.values(), *outputs.values()))
        self.held_bytes += size
        streams.hold_rows, streams.hold_bytes = rows, size
        if self.held_rows >= self.fold_rows or self.held_bytes >= self.fold_bytes:
            self.fold()

    def fold(self) -> None:
        """Everything copied and held since the last fold, counted in the bins."""
        arrays, rows = self.streams.drain()
        held = self.held
        if not rows and not held:
            return
        self.held, self.held_rows, self.held_bytes = [], 0, 0
        parts = []
        if rows:
            parts.append(stream_columns([*self.inputs, *self.outputs], arrays, rows))
        if held:
            parts.append(
                np.concatenate(
                    [
                        held_columns(self.inputs, [(feed, n) for feed, _, n in held]),
                        held_columns(self.outputs, [(out, n) for _, out, n in held]),
                    ]
                )
            )
        columns = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if self.counts is None:
            features = len(columns)
            self.counts = np.zeros((features, self.binner.width), dtype=np.int64)
            self.nan = np.zeros(features, dtype=np.int64)
            self.sums, self.squares = np.zeros(features), np.zeros(features)
        # Compared in float32 when every value is one: known from the streams' dtypes; not
        # checked for held requests (images: too few values a fold for it to pay).
        exact32 = not held and all(
            float32_exact(s, array.dtype, array.shape)
            for s in (*self.inputs, *self.outputs)
            if s.reducer != "none"
            for array in (arrays[(s.output, s.tensor)],)
        )
        nan, sums, squares = self.binner.add(columns, self.counts, exact32)
        self.nan += nan  # type: ignore[operator]
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf: sent as 0 (``_short``)
            self.sums += sums  # type: ignore[operator]
            self.squares += squares  # type: ignore[operator]

    def next_gap(self) -> int:
        """Requests to let pass before the next one binned: geometric (the failures before a
        success of probability ``sample``), so each request is binned with that probability,
        independently of every other, and a request let pass costs the hot path one counter
        and one test, without a draw (``DriftMonitor.observe``)."""
        if self.sample >= 1.0:
            return 0
        return int(math.log(1.0 - self.draw()) / math.log1p(-self.sample))

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
            "binned": self.binned,
            "refused": dict(list(self.refused.items())[:16]),
            "features": features,
        }
        from cloud_sync.drift_summary import DriftSummary

        return DriftSummary.model_validate(doc).model_dump(mode="json")


def _short(value: float) -> float:
    """Seven significant digits: a mean and std to 1e-7 relative, and half the bytes."""
    return float(f"{value:.7g}") if math.isfinite(value) else 0.0
