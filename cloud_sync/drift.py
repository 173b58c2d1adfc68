"""Drift by cohort: the devices' summaries (``cloud_sync.drift_summary``) merged by model,
version, cohort and window, and a verdict per cohort and window.

A cohort is a group of the cloud's registry of groups (``fleet/groups/``), never what a device
says of itself, and ``all`` (every device). Per window, each device's counts are first capped at
what it can have served (``max_device_rate`` rows per second of the window; past it they are
scaled down and the device is named a suspect) and must add up (every feature's bins and NaN
count equal the rows it binned: else the summary is rejected). A device bins a sample of its
requests when it serves more than its budget (``edge_agent.drift``); its counts weigh what it
answered, not what it binned (``drift_stats.Tally``), and ``min_samples`` counts rows binned.

Per feature of a cohort's window: PSI, Jensen-Shannon and KS against the baseline, and the
chi-square p-value. A feature drifts when Benjamini-Hochberg at ``alpha`` over the window's
features rejects it *and* its PSI is at least ``min_psi``, in a window of at least
``min_samples`` rows. The cohort's verdict is ``drift`` only when that holds with any one device
left out (so one device, lying or not, cannot make it alone); a drift that one device carries is
``local``, with the device named; else ``ok``, or ``insufficient`` below ``min_samples``.
Nor can one device hide a drift: a device serving far more than the others (``outweighs``) is
left out in turn, and a drift the rest show, with any other one left out, stands, naming it
(``masked_by``). So a cohort of one device never raises an alarm, and no device silences one.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from cloud_sync.drift_stats import (
    Tally,
    benjamini_hochberg,
    jensen_shannon,
    ks_distance,
    p_value,
    pooled,
    psi,
)
from cloud_sync.drift_summary import KIND, DriftSummary
from cloud_sync.parts import DRIFT_ROOT, read_part
from modelpack.baseline import Baseline
from modelpack.errors import StoreError

log = logging.getLogger(__name__)

ALL = "all"


@dataclass(frozen=True)
class DriftOptions:
    min_samples: int = 200  # rows a cohort's window needs for a verdict
    alpha: float = 0.001  # Benjamini-Hochberg false-discovery rate over one window's features
    min_psi: float = 0.02  # and the effect a drifting feature must show
    max_device_rate: float = 10_000.0  # rows per second a device can serve: its cap per window
    max_out_of_range: float = 0.05  # share of values out of the baseline's range that is reported
    confirm: int = 2  # consecutive drift windows that raise the alarm
    # A device with more rows than this many times the others' mean could hide their drift.
    outweighs: float = 2.0


@dataclass
class DeviceWindow:
    """One device's summaries of one model version in one window, added up: the rows it
    answered, the rows it binned, and per feature its counts weighted by answered over binned
    (``drift_stats.Tally``), and so its NaN counts and sums (estimates over every row)."""

    rows: int = 0
    binned: int = 0
    counts: dict[str, Tally] = field(default_factory=dict)
    nan: dict[str, float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    refused: int = 0

    def add(self, summary: DriftSummary) -> None:
        rows, binned = summary.rows, summary.binned_rows
        weight = rows / binned if binned and rows > binned else 1.0
        self.rows += rows
        self.binned += binned
        self.refused += sum(summary.refused.values())
        for name, f in summary.features.items():
            tally = Tally.of(f.c, rows, binned)
            self.counts[name] = self.counts[name] + tally if name in self.counts else tally
            self.nan[name] = self.nan.get(name, 0.0) + f.nan * weight
            self.sums[name] = self.sums.get(name, 0.0) + f.s * weight


@dataclass(frozen=True)
class Loaded:
    """Summaries read from the store: ``(device, summary)`` and how many were refused, why."""

    summaries: list[tuple[str, DriftSummary]]
    rejected: dict[str, int]


def load_summaries(store: Any, model: str | None = None, version: int | None = None) -> Loaded:
    """Every drift record the ingestion stored (``drift/``), each once (device, boot, seq)."""
    seen: set[tuple[str, str, int]] = set()
    out: list[tuple[str, DriftSummary]] = []
    rejected: dict[str, int] = defaultdict(int)
    for key in store.list(f"{DRIFT_ROOT}/"):
        if not key.endswith(".jsonl.gz"):
            continue
        try:
            records = read_part(store, key)
        except StoreError as exc:
            log.warning("drift: skipped %s", exc)
            rejected["unreadable"] += 1
            continue
        for record in records:
            seq = record.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                rejected["schema"] += 1
                continue
            ident = (str(record.get("device")), str(record.get("boot_id")), seq)
            if record.get("kind") != KIND or ident in seen:
                continue
            seen.add(ident)
            try:
                summary = DriftSummary.model_validate(record.get("data"))
            except ValidationError:
                rejected["schema"] += 1
                continue
            if (model is None or summary.model == model) and (
                version is None or summary.version == version
            ):
                out.append((ident[0], summary))
    return Loaded(out, dict(rejected))


def cohorts_of(store: Any) -> dict[str, list[str]]:
    """Each device's cohorts from the cloud's registry of groups (``all`` is added apart)."""
    try:
        from cloud_sync.groups import list_groups
    except ImportError:  # an edgebento without a registry of groups: one cohort, all
        return {}
    members: dict[str, list[str]] = defaultdict(list)
    for group, devices in list_groups(store).items():
        for device in devices:
            members[device].append(group)
    return dict(members)


def _consistent(summary: DriftSummary, baseline: Baseline) -> bool:
    """Every feature of the baseline, in its bins, adding up to the rows binned; or no feature
    and no row binned (a window whose requests were all let pass: its rows still count)."""
    binned = summary.binned_rows
    if binned == 0 and not summary.features:
        return True
    if set(summary.features) != {f.name for f in baseline.features}:
        return False
    for f in baseline.features:
        counts = summary.features[f.name]
        if len(counts.c) != len(f.counts) or sum(counts.c) + counts.nan != binned:
            return False
    return True


@dataclass
class Cell:
    """One cohort's window of one model version: its devices' capped counts."""

    devices: dict[str, DeviceWindow] = field(default_factory=dict)
    suspects: set[str] = field(default_factory=set)


def merge(
    summaries: Iterable[tuple[str, DriftSummary]],
    baselines: Mapping[tuple[str, int], tuple[str, Baseline]],
    cohorts: Mapping[str, list[str]],
    options: DriftOptions,
) -> tuple[dict[tuple[str, int, str, float], Cell], dict[str, int]]:
    """Cells keyed (model, version, cohort, window_start); rejected summaries by reason."""
    rejected: dict[str, int] = defaultdict(int)
    per_device: dict[tuple[str, int, float, str], DeviceWindow] = {}
    window_s: dict[tuple[str, int, float], float] = {}
    for device, summary in summaries:
        found = baselines.get((summary.model, summary.version))
        if found is None:
            rejected["no_baseline"] += 1
            continue
        sha, baseline = found
        if summary.baseline != sha:
            rejected["baseline_mismatch"] += 1
            continue
        if not _consistent(summary, baseline):
            rejected["inconsistent"] += 1
            continue
        key = (summary.model, summary.version, summary.window_start, device)
        per_device.setdefault(key, DeviceWindow()).add(summary)
        window_s[key[:3]] = summary.window_s
    cells: dict[tuple[str, int, str, float], Cell] = {}
    for (model, version, start, device), dw in per_device.items():
        cap = options.max_device_rate * window_s[(model, version, start)]
        suspect = dw.rows > cap
        if suspect:  # more than it can have served: its weight is cut to what it could
            scale = cap / dw.rows
            dw.counts = {k: v.scaled(scale) for k, v in dw.counts.items()}
            dw.nan = {k: v * scale for k, v in dw.nan.items()}
            dw.sums = {k: v * scale for k, v in dw.sums.items()}
            dw.rows, dw.binned = int(cap), int(dw.binned * scale)
        for cohort in [ALL, *cohorts.get(device, [])]:
            cell = cells.setdefault((model, version, cohort, start), Cell())
            cell.devices[device] = dw
            if suspect:
                cell.suspects.add(device)
    return cells, dict(rejected)


@dataclass(frozen=True)
class FeatureResult:
    name: str
    rows: int
    psi: float
    js: float
    ks: float
    p: float
    drift: bool
    carried_by: tuple[str, ...] = ()  # devices without which it would not drift
    nan_share: float = 0.0
    out_of_range_share: float = 0.0
    mean: float | None = None
    current: tuple[float, ...] = ()  # the window's counts per bin (the report's charts)


@dataclass(frozen=True)
class WindowResult:
    start: float
    rows: int  # answered; the figures are those of the rows binned, ``binned``
    devices: int
    verdict: str  # ok | drift | local | insufficient
    features: tuple[FeatureResult, ...]
    suspects: tuple[str, ...] = ()
    refused: int = 0
    alarm: bool = False  # drift in this window and the ``confirm - 1`` before it
    masked_by: tuple[str, ...] = ()  # a device whose rows hid the drift the others show
    binned: int = 0  # the rows the bins count (``min_samples`` is of these)

    @property
    def local_devices(self) -> tuple[str, ...]:
        return tuple(sorted({d for f in self.features for d in f.carried_by}))


def judge(cell: Cell, baseline: Baseline, start: float, options: DriftOptions) -> WindowResult:
    devices = sorted(cell.devices)
    result = _judge(cell, devices, baseline, start, options)
    if result.verdict in ("drift", "insufficient") or len(devices) < 3:
        return result
    # A device can hide the others' drift only by outweighing them with rows like the
    # baseline's, or by claiming a few rows binned of many answered, which shrinks the pool's
    # effective sample (``drift_stats.Tally``: its squared weights, rows ** 2 / binned): each
    # device far above the others by either is left out in turn (honest devices of similar
    # traffic are not, so the false-alarm rate stays that of one test per window).
    tried: set[str] = set()
    for weights in (
        {d: float(cell.devices[d].rows) for d in devices},
        {d: cell.devices[d].rows ** 2 / max(cell.devices[d].binned, 1) for d in devices},
    ):
        total = sum(weights.values())
        for device in sorted(devices, key=weights.__getitem__, reverse=True)[:3]:
            others = (total - weights[device]) / (len(devices) - 1)
            if weights[device] <= options.outweighs * others:
                break
            if device in tried:
                continue
            tried.add(device)
            rest = [d for d in devices if d != device]
            without = _judge(cell, rest, baseline, start, options)
            if without.verdict == "drift":
                return replace(without, suspects=result.suspects, masked_by=(device,))
    return result


def _judge(
    cell: Cell, devices: list[str], baseline: Baseline, start: float, options: DriftOptions
) -> WindowResult:
    rows = sum(cell.devices[d].rows for d in devices)
    binned = sum(cell.devices[d].binned for d in devices)
    refused = sum(cell.devices[d].refused for d in devices)
    suspects = tuple(sorted(cell.suspects))
    if binned < options.min_samples:
        return WindowResult(
            start, rows, len(devices), "insufficient", (), suspects, refused, binned=binned
        )
    stacked = {
        f.name: [_tally(cell.devices[d], f.name, len(f.counts)) for d in devices]
        for f in baseline.features
    }
    figures = []
    for f in baseline.features:
        current = pooled(stacked[f.name]).counts()
        base = np.asarray(f.counts, dtype=np.float64)
        figures.append((f, current, psi(base, current), p_value(base, current)))
    thresholds = benjamini_hochberg([fig[3] for fig in figures], options.alpha)
    results = []
    for (f, current, f_psi, p), threshold in zip(figures, thresholds, strict=True):
        drift = threshold > 0 and f_psi >= options.min_psi
        carried: tuple[int, ...] = ()
        base = np.asarray(f.counts, dtype=np.float64)
        if drift:
            carried = _carriers(stacked[f.name], base, options)
        n = float(current.sum())
        nan = sum(cell.devices[d].nan.get(f.name, 0.0) for d in devices)
        total = sum(cell.devices[d].sums.get(f.name, 0.0) for d in devices)
        served = float(pooled(stacked[f.name]).weighted.sum())  # non-NaN rows, estimated
        results.append(
            FeatureResult(
                f.name,
                int(n),
                f_psi,
                jensen_shannon(base, current),
                ks_distance(base, current),
                p,
                drift,
                tuple(devices[i] for i in carried),
                nan / max(rows, 1),
                float(current[0] + current[-1]) / max(n, 1.0),
                total / served if served and f.kind == "numeric" else None,
                tuple(float(c) for c in current),
            )
        )
    robust = any(r.drift and not r.carried_by for r in results)
    verdict = "drift" if robust else "local" if any(r.drift for r in results) else "ok"
    return WindowResult(
        start, rows, len(devices), verdict, tuple(results), suspects, refused, binned=binned
    )


def _tally(device: DeviceWindow, feature: str, bins: int) -> Tally:
    """The device's counts of the feature: none when it binned no row of the window."""
    found = device.counts.get(feature)
    return found if found is not None else Tally(np.zeros(bins))


def _carriers(per_device: list[Tally], base: np.ndarray, options: DriftOptions) -> tuple[int, ...]:
    """The devices without whom the feature would not drift (leave-one-out)."""
    if len(per_device) == 1:
        return (0,)
    total = pooled(per_device)
    carriers = []
    for i in range(len(per_device)):
        rest = (total - per_device[i]).counts()
        if rest.sum() <= 0:  # the rest's size speaks through its p-value, not a floor
            carriers.append(i)
            continue
        # Still evident without it: the rest alone, at the plain level and half the effect (a
        # test of one device's weight, not a second full test that a tenth fewer rows fails).
        if p_value(base, rest) > options.alpha or psi(base, rest) < options.min_psi / 2:
            carriers.append(i)
    return tuple(carriers)


def evaluate(
    loaded: Loaded,
    baselines: Mapping[tuple[str, int], tuple[str, Baseline]],
    cohorts: Mapping[str, list[str]],
    options: DriftOptions | None = None,
) -> dict[tuple[str, int, str], list[WindowResult]]:
    """Windows, oldest first, per (model, version, cohort)."""
    options = options or DriftOptions()
    cells, rejected = merge(loaded.summaries, baselines, cohorts, options)
    for reason, n in rejected.items():
        loaded.rejected[reason] = loaded.rejected.get(reason, 0) + n
    out: dict[tuple[str, int, str], list[WindowResult]] = defaultdict(list)
    for (model, version, cohort, start), cell in sorted(cells.items()):
        baseline = baselines[(model, version)][1]
        result = judge(cell, baseline, start, options)
        out[(model, version, cohort)].append(
            _confirmed(out[(model, version, cohort)], result, options)
        )
    return dict(out)


def _confirmed(
    before: list[WindowResult], result: WindowResult, options: DriftOptions
) -> WindowResult:
    """The alarm: drift in ``confirm`` consecutive windows (one window's false alarms, about
    1 in 400 per cohort at the defaults, do not page anyone; docs/monitoring.md)."""
    if result.verdict != "drift":
        return result
    recent = [result, *reversed(before[-(options.confirm - 1) :] if options.confirm > 1 else [])]
    run = len(list(itertools.takewhile(lambda w: w.verdict == "drift", recent)))
    return replace(result, alarm=run >= options.confirm)
