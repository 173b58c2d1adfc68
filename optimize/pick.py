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


def pick(candidates: Sequence[Candidate]) -> Choice:
    baseline = next(c for c in candidates if c.name == BASELINE)
    assert baseline.latency is not None
    fp32_ms = baseline.latency.p50_ms
    usable = [c for c in candidates if c.within_budget]
    faster = [c for c in usable if c.latency and c.latency.p50_ms < fp32_ms * (1 - NOISE)]
    if not faster:
        failed = [c for c in candidates if c.name != BASELINE]
        why = (
            "no candidate was built"
            if not failed
            else "no candidate is faster than FP32 within the budget"
        )
        return Choice(baseline, f"kept FP32: {why}")
    best_ms = min(c.latency.p50_ms for c in faster if c.latency)
    close = [c for c in faster if c.latency and c.latency.p50_ms <= best_ms * (1 + NOISE)]
    chosen = min(
        close,
        key=lambda c: (c.size.gzip_bytes if c.size else 0, c.latency.p50_ms if c.latency else 0),
    )
    assert chosen.latency is not None
    return Choice(
        chosen,
        f"fastest within budget: {fp32_ms / chosen.latency.p50_ms:.2f}x faster than FP32"
        + (" (smallest of those within 5% of the fastest)" if len(close) > 1 else ""),
    )
