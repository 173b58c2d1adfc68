"""The rollout gate on drift (``edgebento rollout --drift-gate [PSI]``): after a wave's bake, the
output distribution of the devices already on the new version (the canary cohort) is compared
with that of the devices still serving another version of the same model (the control cohort),
from the drift summaries the ingestion stored since the wave was pushed (``cloud_sync.drift``).

Compared: each class output (``<tensor>.class``, counted by class index, so its bins mean the
same in every version). A feature moves when its PSI between the cohorts is at least the gate's
and the chi-square test rejects equal distributions at ``alpha``; as elsewhere, that must hold
with any one device of either cohort left out, so one device (lying or not) cannot abort a
rollout alone and a one-device cohort never does. Each cohort needs ``min_rows`` rows; fewer say
nothing and the rollout goes on (the line says so). Devices that binned a sample of their rows
weigh what they answered (``drift_stats.Tally``), across devices and windows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_sync.drift import load_summaries
from cloud_sync.drift_stats import Tally, p_value, pooled, psi
from cloud_sync.rollout_host import DriftGateHost
from cloud_sync.rollout_state import AbortFigures

log = logging.getLogger(__name__)
Counts = dict[str, dict[str, Tally]]  # feature -> device -> counts


@dataclass(frozen=True)
class Moved:
    feature: str
    psi: float
    p_value: float
    canary_rows: int
    control_rows: int
    canary_devices: int
    control_devices: int


@dataclass
class DriftGate:
    store: Any
    max_psi: float
    alpha: float = 0.001
    min_rows: int = 200

    def cohorts(
        self, name: str, version: int, canary: set[str], since: float
    ) -> tuple[Counts, Counts]:
        """Class-output counts per feature and device, of the canary on ``version`` and of the
        other devices on other versions, from windows that began at ``since`` or later."""
        ours: Counts = {}
        theirs: Counts = {}
        for device, s in load_summaries(self.store, model=name).summaries:
            if s.window_start < since:
                continue
            on_new = s.version == version
            if on_new != (device in canary):
                continue  # a canary device's old windows, or a control device that updated
            side = ours if on_new else theirs
            for feature, counts in s.features.items():
                if not feature.endswith(".class"):
                    continue
                c = Tally.of(counts.c, s.rows, s.binned_rows)
                per = side.setdefault(feature, {})
                old = per.get(device)
                per[device] = c if old is None or len(old.weighted) != len(c.weighted) else old + c
        return ours, theirs

    def moved(self, ours: Counts, theirs: Counts) -> tuple[list[Moved], str]:
        """The class outputs that moved with any one device left out, and what was judged."""
        found, judged = [], []
        for feature in sorted(set(ours) & set(theirs)):
            a, b = ours[feature], theirs[feature]
            if len({len(c.weighted) for c in [*a.values(), *b.values()]}) != 1:
                continue  # a different number of classes: nothing to compare bin by bin
            rows_a, rows_b = (
                int(_total(list(a.values())).sum()),
                int(_total(list(b.values())).sum()),
            )
            judged.append(f"{feature}: {rows_a} rows from {len(a)} against {rows_b} from {len(b)}")
            if len(a) < 2 or len(b) < 2:
                continue  # one device alone never decides
            verdicts = []
            for side, other, left in [(a, b, d) for d in a] + [(b, a, d) for d in b]:
                kept = _total([c for d, c in side.items() if d != left])
                rest = _total(list(other.values()))
                small = min(kept.sum(), rest.sum()) < self.min_rows
                canary, control = (kept, rest) if side is a else (rest, kept)
                score, p = psi(control, canary), p_value(control, canary)
                verdicts.append(not small and score >= self.max_psi and p < self.alpha)
            if all(verdicts):
                canary, control = _total(list(a.values())), _total(list(b.values()))
                score, p = psi(control, canary), p_value(control, canary)
                found.append(Moved(feature, score, p, rows_a, rows_b, len(a), len(b)))
        return found, "; ".join(judged) or "no class output summarised by both cohorts"

    def check(self, rollout: DriftGateHost, index: int) -> tuple[str, AbortFigures] | None:
        state = rollout.state
        canary = {d.device for w in range(index + 1) for d in state.wave(w) if d.state == "done"}
        # Windows that began after the wave was pushed (the rollout's clock is monotonic).
        since = time.time() - (time.monotonic() - rollout._wave_started)
        ours, theirs = self.cohorts(state.name, state.version, canary, since)
        moved, judged = self.moved(ours, theirs)
        if not moved:
            rollout.say(f"drift gate: no output moved ({judged})")
            return None
        m = moved[0]
        reason = (
            f"the output {m.feature} of v{state.version} moved from the control cohort's: PSI "
            f"{m.psi:.3f} (gate {self.max_psi:g}), p {m.p_value:.2g}, {m.canary_rows} rows from "
            f"{m.canary_devices} devices against {m.control_rows} from {m.control_devices}"
        )
        rollout.say(f"drift gate: {reason}")
        return reason, AbortFigures(touched=len(canary), reporting=m.canary_devices)


def _total(counts: list[Tally]) -> np.ndarray:
    return pooled(counts).counts() if counts else np.zeros(0)
