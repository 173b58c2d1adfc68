"""The budget and the pick: the fastest candidate that stays within it, else FP32, with why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from optimize.metrics import MetricSpec
from optimize.verify import Fidelity, Latency, Size

# Latencies closer than this are noise on a shared CPU: among them the smaller model wins.
NOISE = 0.05
# "Close" for row independence: a candidate whose rows depend on their neighbours (dynamic int8
# scales a whole batch at once) is served one request at a time, and its answers for a row
# change with the rows sent beside it. It is picked over the fastest row-independent choice
# (FP32 included) only when it is more than this much faster per row as served.
ROW_MARGIN = 0.10
BASELINE = "fp32"


@dataclass(frozen=True)
class Budget:
    """``max_drop`` is a fraction: 0.01 means one accuracy point, or 99% agreement and cosine.

    Each deciding metric must stay within ``max_drop`` of FP32's own score (or inside the bound
    its ``--metric`` gives); ``metrics`` are the user's, empty for the defaults.
    """

    max_drop: float
    labels: bool
    metrics: tuple[MetricSpec, ...] = ()

    def violation(self, reference: Fidelity, found: Fidelity) -> str | None:
        failing = [s for s in found.scores if s.decides and not s.ok]
        if not failing:
            return None
        worst = min(failing, key=lambda s: s.margin)
        sign = "<" if worst.higher_is_better else ">"
        return f"{worst.key} {worst.value:.4f} {sign} {worst.bound:.4f}"

    def describe(self) -> str:
        if self.metrics:
            what = ", ".join(f"{m.output + ' ' if m.output else ''}{m.label}" for m in self.metrics)
        elif self.labels:
            return f"accuracy drop <= {self.max_drop * 100:.2f} points"
        else:
            what = "the default metric of each output"
        return f"{what} within {self.max_drop:g} of FP32"


@dataclass(frozen=True)
class Candidate:
    name: str
    steps: tuple[str, ...]
    path: Path | None
    config: dict[str, Any]
    fidelity: Fidelity | None = None
    latency: Latency | None = None
    size: Size | None = None
    error: str | None = None  # why it failed to build or run
    violation: str | None = None  # why it is outside the budget
    # Whether the service batches it with other requests (None: never loaded), and why not.
    row_independent: bool | None = None
    batching_off: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency is not None

    @property
    def within_budget(self) -> bool:
        return self.ok and self.violation is None


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str


def judge(candidates: Sequence[Candidate], budget: Budget, reference: Fidelity) -> list[Candidate]:
    return [
        replace(c, violation=budget.violation(reference, c.fidelity))
        if c.ok and c.fidelity is not None
        else c
        for c in candidates
    ]


def _ms(c: Candidate) -> float:
    assert c.latency is not None
    return c.latency.ms_per_row


def pick(candidates: Sequence[Candidate]) -> Choice:
    """The fastest per row as the service runs each one, within the budget; ties (``NOISE``) go
    to the smallest, and rows that mix (``ROW_MARGIN``) must pay for themselves."""
    baseline = next(c for c in candidates if c.name == BASELINE)
    fp32_ms = _ms(baseline)
    usable = [c for c in candidates if c.within_budget]
    faster = [c for c in usable if c.name != BASELINE and _ms(c) < fp32_ms * (1 - NOISE)]
    if not faster:
        failed = [c for c in candidates if c.name != BASELINE]
        why = (
            "no candidate was built"
            if not failed
            else "no candidate is faster than FP32 within the budget"
        )
        return Choice(baseline, f"kept FP32: {why}")
    pool, why = _row_independent_first(faster, baseline)
    if not pool:
        return Choice(baseline, f"kept FP32: {why}")
    best_ms = min(_ms(c) for c in pool)
    close = [c for c in pool if _ms(c) <= best_ms * (1 + NOISE)]
    chosen = min(close, key=lambda c: (c.size.gzip_bytes if c.size else 0, _ms(c)))
    notes = []
    if len(close) > 1:
        notes.append("smallest of those within 5% of the fastest")
    if why:
        notes.append(why)
    elif chosen.row_independent is False:
        notes.append("rows depend on their neighbours: served one request at a time")
    return Choice(
        chosen,
        f"fastest within budget: {fp32_ms / _ms(chosen):.2f}x faster than FP32"
        + (f" ({'; '.join(notes)})" if notes else ""),
    )


def _row_independent_first(
    faster: list[Candidate], baseline: Candidate
) -> tuple[list[Candidate], str]:
    """``faster`` without the row-dependent candidates when a row-independent choice (FP32
    included) is within ``ROW_MARGIN`` of the fastest of them, with why; else all of it."""
    dependent = [c for c in faster if c.row_independent is False]
    if not dependent:
        return faster, ""
    independent = [c for c in faster if c.row_independent is not False]
    best = min(dependent, key=_ms)
    rivals = independent + ([baseline] if baseline.row_independent is not False else [])
    if not rivals:
        return faster, ""
    rival = min(rivals, key=_ms)
    if _ms(rival) > _ms(best) * (1 + ROW_MARGIN):
        return faster, ""  # more than ROW_MARGIN faster: speed wins, the reason says the cost
    why = (
        f"preferred to {best.name}, whose rows depend on their neighbours: such a candidate must"
        f" be more than {ROW_MARGIN:.0%} faster per row, and it is {_ms(rival) / _ms(best):.2f}x"
    )
    return independent, why
