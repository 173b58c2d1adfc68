"""A rollout's health checks: devices judged one by one, never sums one device can move.

Import path and API::

    from cloud_sync.rollout_checks import abort_reason, judge
    verdict = judge(state, watch, upto_wave=1)   # Verdict(kind, reason, figures)

Install outcomes (``device_outcome``) are read from structured fields of a device's status,
never a clock or message text. A device can claim its own update failed, so failures are judged
like figures, wave by wave: a wave aborts the rollout when more than ``abort_failure_rate``
percent of its devices failed *and* at least ``failures_to_abort(n)`` of them did: one in a wave
of fewer than ``TOLERANT_WAVE`` devices (a small canary stops at its first failure), two in a
larger one, so one liar per wave of 4 or more cannot abort a healthy rollout. A bad version
fails on most devices of the first wave it reaches, which is all the rule needs.

Telemetry (``cloud_sync.watch`` says whose figures count and bounds them): a device *reports*
when its status runs the new version and it sent at least ``min_inferences`` on it; it is *bad*
when its own error rate is over ``abort_failure_rate`` or its own p99 over ``abort_p99_ratio``
times its p99 on its previous version (or, if it sent none, the median of the rollout's devices
on theirs). With ``min_devices`` reporting devices (at most as many as were updated), the rollout
aborts when more than ``abort_device_share`` percent of them are bad, over every wave so far;
a wave is verified once as many of its own devices report too (at least one), so no wave is
vouched for by earlier waves alone. A few liars among honest devices can therefore neither abort
a good rollout nor carry a bad one, as long as they stay under that share; one that claims more
than a device can serve is a suspect, named with its reason, and counts for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cloud_sync.protocol import ModelRef, Status
from cloud_sync.rollout_state import AbortFigures, DeviceProgress, RolloutState
from cloud_sync.watch import FleetWatch, VersionStats

TOUCHED = ("unknown", "updating", "offline", "done", "failed", "rolled_back")
SUSPECTS_KEPT = 100  # in the saved state; the count is in the figures


def same(a: ModelRef | None, b: ModelRef | None) -> bool:
    return a is not None and b is not None and (a.name, a.version) == (b.name, b.version)


def device_outcome(
    status: Status | None, target: ModelRef, rollout: str, generation: int
) -> tuple[str, str] | None:
    """("done" | "failed", detail) once the device's status says how the update went."""
    if status is None:
        return None
    applied = status.applied
    if (
        applied is not None
        and applied.generation == generation
        and applied.rollout == rollout
        and same(applied.model, target)
    ):
        if applied.outcome == "installed":
            return "done", f"runs v{target.version}"
        return "failed", f"{applied.outcome}: {applied.reason or 'no reason given'}"
    if same(status.model, target):
        return "done", f"runs v{target.version}"
    return None


@dataclass(frozen=True)
class Verdict:
    kind: Literal["abort", "verified", "waiting"]
    reason: str
    figures: AbortFigures


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _old_stats(watch: FleetWatch, progress: DeviceProgress) -> VersionStats | None:
    previous = progress.previous
    return watch.device_stats(progress.device, previous.version) if previous else None


def _badness(
    state: RolloutState, stats: VersionStats, old_p99: float | None, device: str
) -> str | None:
    t, version = state.thresholds, state.version
    rate = stats.error_rate_pct or 0.0
    if rate > t.abort_failure_rate:
        return (
            f"inference error rate on v{version} is {rate:.1f}% on {device} "
            f"(over {t.abort_failure_rate:g}%)"
        )
    new_p99 = stats.p99_ms
    if new_p99 is not None and old_p99:
        ratio = new_p99 / old_p99
        if ratio > t.abort_p99_ratio:
            return (
                f"p99 on v{version} is {new_p99:.1f} ms on {device}, {ratio:.2f}x the "
                f"previous {old_p99:.1f} ms (over {t.abort_p99_ratio:g}x)"
            )
    return None


def judge(state: RolloutState, watch: FleetWatch, upto_wave: int) -> Verdict:
    """The telemetry verdict on the devices of waves ``0..upto_wave`` that run the new version."""
    t = state.thresholds
    updated = [d for w in range(upto_wave + 1) for d in state.wave(w) if d.state == "done"]
    for progress in updated:
        reason = watch.suspects.get(progress.device)
        kept = progress.device in state.suspects or len(state.suspects) >= SUSPECTS_KEPT
        if reason is not None and not kept:
            state.suspects[progress.device] = reason
    old_p99s = [
        p99
        for d in state.devices
        if (old := _old_stats(watch, d)) is not None and (p99 := old.p99_ms) is not None
    ]
    baseline = _median(old_p99s)
    reporting: list[VersionStats] = []
    bad: list[str] = []
    in_wave = 0  # reporting devices of the wave judged now: each wave must show its own
    for progress in updated:
        if progress.device in watch.suspects:
            continue
        stats = watch.device_stats(progress.device, state.version)
        if stats is None or stats.count < t.min_inferences:
            continue
        reporting.append(stats)
        in_wave += progress.wave == upto_wave
        old = _old_stats(watch, progress)
        own = old.p99_ms if old is not None else None
        why = _badness(state, stats, own or baseline, progress.device)
        if why is not None:
            bad.append(why)
    inferences = sum(s.count for s in reporting)
    errors = sum(s.errors for s in reporting)
    figures = AbortFigures(
        failed=state.count("failed"),
        touched=state.count(*TOUCHED),
        reporting=len(reporting),
        bad=len(bad),
        suspects=sum(1 for d in updated if d.device in watch.suspects),
        inferences=inferences,
        errors=errors,
        error_rate_pct=100.0 * errors / inferences if inferences else None,
        new_p99_ms=_median([p for s in reporting if (p := s.p99_ms) is not None]),
        old_p99_ms=baseline,
    )
    need = max(1, min(t.min_devices, len(updated)))
    if len(reporting) >= need and bad and 100.0 * len(bad) / len(reporting) > t.abort_device_share:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        return Verdict(
            "abort",
            f"{shown}: {len(bad)} of {len(reporting)} reporting devices over a threshold "
            f"(more than {t.abort_device_share:g}% of them)",
            figures,
        )
    wave_need = max(1, min(t.min_devices, sum(d.wave == upto_wave for d in updated)))
    if len(reporting) < need or in_wave < wave_need:
        this_wave = f", {in_wave} of the {wave_need} of this wave" if upto_wave else ""
        return Verdict(
            "waiting",
            f"{len(reporting)} of the {need} devices needed reported {t.min_inferences} "
            f"inferences on v{state.version}{this_wave}",
            figures,
        )
    return Verdict(
        "verified",
        f"{len(bad)} of {len(reporting)} reporting devices over a threshold "
        f"(at most {t.abort_device_share:g}% may be)",
        figures,
    )


TOLERANT_WAVE = 4  # from this size on, a wave tolerates one device that says it failed


def failures_to_abort(wave_size: int) -> int:
    """Failed devices a wave needs before its failure share can abort the rollout."""
    return 1 if wave_size < TOLERANT_WAVE else 2


def abort_reason(
    state: RolloutState, watch: FleetWatch, telemetry: bool = True
) -> tuple[str, AbortFigures] | None:
    """Why the rollout must stop: too many failed updates (O(1), from the kept counts) or, with
    ``telemetry``, the devices' figures (O(devices) a few times a second)."""
    t = state.thresholds
    if state.count("failed"):
        for index in range(min(state.current_wave, state.wave_count - 1) + 1):
            failed, size = state.failed(index), len(state.wave(index))
            if failed >= failures_to_abort(size) and 100.0 * failed / size > t.abort_failure_rate:
                touched = state.count(*TOUCHED)
                return (
                    f"{failed} of {size} updated devices failed in the {wave_label(state, index)}"
                    f" (over {t.abort_failure_rate:g}%): {state.first_failure}"
                ), AbortFigures(failed=state.count("failed"), touched=touched)
    if not telemetry:
        return None
    verdict = judge(state, watch, min(state.current_wave, state.wave_count - 1))
    state.figures = verdict.figures
    return (verdict.reason, verdict.figures) if verdict.kind == "abort" else None


def describe(figures: AbortFigures, version: int) -> str:
    """The figures in one line of a wave's progress."""
    rate = "-" if figures.error_rate_pct is None else f"{figures.error_rate_pct:.1f}%"
    p99 = "-" if figures.new_p99_ms is None else f"{figures.new_p99_ms:.1f} ms"
    old = "" if figures.old_p99_ms is None else f" (before {figures.old_p99_ms:.1f} ms)"
    suspects = f", {figures.suspects} suspect" if figures.suspects else ""
    return (
        f"{figures.reporting} reporting, {figures.bad} over a threshold{suspects}; "
        f"{figures.inferences:.0f} inferences on v{version}, error rate {rate}, p99 {p99}{old}"
    )


def wave_label(state: RolloutState, index: int) -> str:
    name = "canary" if index == 0 else f"wave {index}"
    return f"{name} ({index + 1}/{state.wave_count})"


def wave_line(state: RolloutState, index: int, doing: str) -> str:
    """A wave's progress: its devices, the figures seen, and what the controller does now."""
    wave = state.wave(index)
    done = sum(d.state == "done" for d in wave)
    failed = sum(d.state in ("failed", "rolled_back") for d in wave)
    figures = state.figures or AbortFigures()
    return (
        f"{wave_label(state, index)}: {done} of {len(wave)} on v{state.version}"
        f"{f', {failed} failed' if failed else ''}; {describe(figures, state.version)}; {doing}"
    )


def unverified_reason(state: RolloutState, index: int) -> str:
    t = state.thresholds
    why = state.checks[-1].detail.removeprefix("not verified: ")
    return (
        f"{wave_label(state, index)} could not be judged in {t.wave_timeout_s + t.bake_s:g}s "
        f"(wave timeout + bake): {why}; error rate and p99 were not checked (a device is judged"
        f" once it served --min-inferences on v{state.version}: it needs traffic), so the next"
        " wave was not pushed. Resume to wait again, resume with --allow-unverified to go on, or"
        " roll back"
    )
