"""A simulated fleet for drift: real packs with a baseline, the agent's own ``DriftMonitor`` per
device (on a simulated clock), the model really run by ONNX Runtime, and the cloud's verdicts.

Cohorts are groups of the cloud's registry; one cohort's inputs can be shifted (a mean shift of
some standard deviations on one feature) or its class balance moved (inputs drawn from one
class's region more often)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.drift import DriftOptions, Loaded, evaluate
from cloud_sync.drift_summary import DriftSummary
from edge_agent.drift import BUDGET_ROWS, DriftMonitor
from modelpack.baseline import BASELINE_FILE, make_baseline
from modelpack.loader import load_pack
from modelpack.pack import Pack
from modelpack.predictor import Predictor

WINDOW_S = 60.0
N_IN = 8


def drift_pack(tmp: Path, rows: int = 5000, seed: int = 0) -> Pack:
    """An MLP pack (x[8] -> logits, probs) with a baseline of ``rows`` standard normal rows."""
    from tests.support import models
    from tests.support.agent import make_pack

    model = models.mlp(tmp / "drift-mlp.onnx", n_in=N_IN)
    root = make_pack(tmp / "drift-pack", model, None, 1, name="drifty")
    x = np.random.default_rng(seed).standard_normal((rows, N_IN)).astype(np.float32)
    make_baseline(root, {"x": x})
    return load_pack(root, trusted=(), allow_unsigned=True)


Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def mean_shift(feature: int, sigmas: float) -> Shift:
    def shift(x: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
        x = x.copy()
        x[:, feature] += sigmas
        return x

    return shift


def class_balance(predictor: Predictor, favoured: int, share: float) -> Shift:
    """Replace ``share`` of the rows by rows the model puts in class ``favoured``."""

    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pool = rng.standard_normal((len(x) * 8, N_IN)).astype(np.float32)
        top = np.argmax(predictor.run({"x": pool})["probs"], axis=1)
        chosen = pool[top == favoured]
        x = x.copy()
        take = rng.random(len(x)) < share
        n = min(int(take.sum()), len(chosen))
        x[np.flatnonzero(take)[:n]] = chosen[:n]
        return x

    return shift


@dataclass
class SimFleet:
    pack: Pack
    cohorts: dict[str, list[str]]  # cohort -> devices
    rows_per_device: int = 60  # rows each device serves in a window
    seed: int = 7
    budget_rows: int = BUDGET_ROWS  # each device's (``edge_agent.drift``)

    def __post_init__(self) -> None:
        self.predictor = Predictor.from_pack(self.pack)
        self.rng = np.random.default_rng(self.seed)
        self.now = 1_700_000_000.0 - 1_700_000_000.0 % WINDOW_S
        self.monitors = {
            d: DriftMonitor(
                lambda: self.pack,
                WINDOW_S,
                clock=lambda: self.now,
                budget_rows=self.budget_rows,
                rng=random.Random(f"{self.seed}-{d}"),
            )
            for devices in self.cohorts.values()
            for d in devices
        }
        self.summaries: list[tuple[str, DriftSummary]] = []

    def window(self, shifts: dict[str, Shift] | None = None) -> None:
        """One window of traffic on every device, then each sends its summary."""
        shifts = shifts or {}
        m = self.pack.manifest
        for cohort, devices in self.cohorts.items():
            for device in devices:
                x = self.rng.standard_normal((self.rows_per_device, N_IN)).astype(np.float32)
                if cohort in shifts:
                    x = shifts[cohort](x, self.rng)
                for start in range(0, len(x), 20):  # requests of 20 rows
                    feed = {"x": x[start : start + 20]}
                    out = self.predictor.run(feed)
                    self.monitors[device].observe(m.name, str(m.version), feed, out, len(feed["x"]))
        self.now += WINDOW_S
        for device, monitor in self.monitors.items():
            for doc in monitor.collect():
                self.summaries.append((device, DriftSummary.model_validate(doc)))

    def verdicts(self, options: DriftOptions | None = None) -> dict[str, list[str]]:
        """Each cohort's verdict per window, oldest first."""
        members: dict[str, list[str]] = {}
        for cohort, devices in self.cohorts.items():
            for d in devices:
                members.setdefault(d, []).append(cohort)
        results = evaluate_summaries(self.pack, self.summaries, members, options)
        return {
            cohort: ["alarm" if w.alarm else w.verdict for w in windows]
            for (_, _, cohort), windows in results.items()
        }


def evaluate_summaries(
    pack: Pack,
    summaries: list[tuple[str, DriftSummary]],
    members: dict[str, list[str]],
    options: DriftOptions | None = None,
) -> dict[tuple[str, int, str], list[Any]]:
    """The cloud's windows per (model, version, cohort) for ``summaries`` of ``pack``'s model."""
    from modelpack.baseline import read_baseline

    sha = pack.manifest.file(BASELINE_FILE).sha256  # type: ignore[union-attr]
    baseline = read_baseline(pack.root)
    assert baseline is not None
    key = (pack.manifest.name, pack.manifest.version)
    return evaluate(Loaded(list(summaries), {}), {key: (sha, baseline)}, members, options)


def first_alarm(verdicts: list[str], after: int = 0) -> int | None:
    """Windows from ``after`` until the first alarm (1 = the first window)."""
    for i, verdict in enumerate(verdicts[after:], start=1):
        if verdict == "alarm":
            return i
    return None


def summary_bytes(fleet: SimFleet) -> list[int]:
    import json

    return [
        len(json.dumps(s.model_dump(mode="json"), separators=(",", ":")))
        for _, s in fleet.summaries
    ]


def as_records(fleet: SimFleet) -> list[dict[str, Any]]:
    return [{"device": d, "summary": s} for d, s in fleet.summaries]
