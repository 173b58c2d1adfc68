"""The time budget: how long the candidates left will take, and when to stop trying new ones.

Each candidate's cost (build plus the eval run) is recorded by kind, because a static one
calibrates and a dynamic one does not; the first candidates of a kind estimate the rest. The
search stops starting candidates once the budget is spent, or when one would end past it by
its kind's estimate, and keeps the best found so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.pick import Candidate
from optimize.quantize import QuantizeConfig

DEFAULT_TIME_BUDGET = 600.0  # seconds; docs/optimize.md says so
Planned = tuple[str, Path, QuantizeConfig | None]
Show = Callable[[int, str], None]  # (candidates done, the progress line)


def kind(config: QuantizeConfig | None) -> str:
    return "base" if config is None else config.mode


def seconds_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "no limit"
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


@dataclass
class Clock:
    """``budget`` in seconds from ``start`` (the call to ``optimize_model``); 0: no limit."""

    budget: float
    start: float = field(default_factory=time.monotonic)
    costs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.start + self.budget if self.budget > 0 else math.inf

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def estimate(self, what: str) -> float | None:
        """The mean cost of that kind so far, else of every candidate so far."""
        seen = self.costs.get(what) or [c for costs in self.costs.values() for c in costs]
        return sum(seen) / len(seen) if seen else None

    def fits(self, what: str) -> bool:
        guess = self.estimate(what) or 0.0
        return time.monotonic() + guess <= self.deadline

    def record(self, what: str, seconds: float) -> None:
        self.costs.setdefault(what, []).append(seconds)

    def left(self, kinds: Sequence[str], tail: float) -> float | None:
        """Seconds until the pick: the candidates left (never past the budget) and ``tail``,
        the latency rounds after them; None before any candidate has a cost."""
        guesses = [self.estimate(k) for k in kinds]
        if any(g is None for g in guesses):
            return None
        work = sum(g or 0.0 for g in guesses)
        return min(work, max(0.0, self.deadline - time.monotonic())) + tail


def left_text(seconds: float | None) -> str:
    if seconds is None:
        return "estimating time left"
    return "under 1 min left" if seconds < 60 else f"about {math.ceil(seconds / 60)} min left"


def run_planned(
    search: Any, planned: Sequence[Planned], clock: Clock, show: Show, tail: float
) -> tuple[list[Candidate], list[str]]:
    """Every planned candidate measured, or listed as not tried when the budget says no;
    ``show`` gets the progress line. Returns (candidates, names not tried)."""
    measured: list[Candidate] = []
    skipped: list[str] = []
    total = len(planned)
    for index, (base_name, path, config) in enumerate(planned):
        what = kind(config)
        left = clock.left([kind(c) for _, _, c in planned[index:]], tail)
        show(index, f"candidate {index + 1} of {total}, {left_text(left)}")
        if not clock.fits(what):
            guess = clock.estimate(what)
            why = (
                f"not tried: the time budget of {seconds_text(clock.budget)} ran out"
                if clock.spent() or guess is None
                else f"not tried: it would take about {guess:.0f} s, past the time budget of"
                f" {seconds_text(clock.budget)}"
            )
            measured.append(search.skipped(base_name, config, why))
            skipped.append(measured[-1].name)
            continue
        started = time.monotonic()
        if config is None:
            measured.append(search.measure(Candidate(base_name, (base_name,), path, {})))
        else:
            measured.append(search.measure(search.quantized(base_name, path, config)))
        clock.record(what, time.monotonic() - started)
    show(total, f"{total} candidates done")
    return measured, skipped


def stopped_note(clock: Clock, tried: int, skipped: Sequence[str], refine_cut: bool) -> str:
    what = f"not tried: {', '.join(skipped)}" if skipped else "every planned candidate was tried"
    cut = "; keeping sensitive nodes in float was cut short" if refine_cut else ""
    return (
        f"the time budget of {seconds_text(clock.budget)} stopped the search: {tried} of"
        f" {tried + len(skipped)} candidates tried; {what}{cut}"
        " (--time-budget SECONDS for more, 0 for no limit)"
    )


def summary(clock: Clock, tried: int, skipped: Sequence[str], refine_cut: bool) -> dict[str, Any]:
    """report.json's ``time_budget``: what the budget was and what it stopped."""
    return {
        "seconds": clock.budget if clock.budget > 0 else None,
        "elapsed_s": round(time.monotonic() - clock.start, 1),
        "stopped": bool(skipped) or refine_cut,
        "tried": tried,
        "not_tried": list(skipped),
        "refinement_cut": refine_cut,
        "estimate_s": {k: round(sum(v) / len(v), 2) for k, v in clock.costs.items()},
    }
