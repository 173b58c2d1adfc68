"""Staged rollouts: desired state wave by wave, watched, and rolled back when the fleet says so.

Import path and API::

    from cloud_sync.rollout import Rollout, start_rollout
    state = start_rollout(store, watch, name, version, devices, thresholds)   # plans and saves
    state = Rollout(store, watch, state, timeout_s=600, wait_all=False).run() # or a loaded state

Each target gets a retained ``Desired`` document on ``{prefix}/{device}/desired``: the canary
first, then the waves. A wave is finished when every online device in it reports the new version
in its retained status (which the agent does only after the pack passed its health check on the
golden samples), or has failed (its status shows the update rolled back or refused). A device that
is offline gets its desired state all the same and catches up when it connects; it does not hold
the rollout up unless ``wait_all``. The rollout aborts when the share of failed devices, or the
inference error rate on the new version, is over ``abort_failure_rate`` percent, or when the
new version's p99 latency is over ``abort_p99_ratio`` times the previous version's (both from
telemetry, once ``min_inferences`` ran on the new version; each settled wave is watched for
``bake_s`` before the next one, so there is traffic to judge); then every
touched device is set back to its previous version through its retained desired state, marked
``rollback`` (an agent downgrades only when the desired state says so), so a device that is
offline during the abort goes back when it connects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cloud_sync.protocol import Desired, ModelRef, Status
from cloud_sync.rollout_state import (
    DeviceProgress,
    RolloutState,
    Thresholds,
    new_rollout,
    save_state,
)
from cloud_sync.store import ObjectStore
from cloud_sync.watch import FleetWatch

log = logging.getLogger(__name__)
_FAILED_OUTCOMES = ("rolled_back", "refused")
ROLLBACK_WAIT_S = 30.0


def start_rollout(
    store: ObjectStore,
    watch: FleetWatch,
    name: str,
    version: int,
    devices: list[str],
    thresholds: Thresholds,
) -> RolloutState:
    """Plan the waves from what each device runs now, and save the plan."""
    previous = {}
    for device in devices:
        status = watch.statuses.get(device)
        previous[device] = status.model if status is not None and status.model else None
    state = new_rollout(name, version, devices, previous, thresholds, watch.topics.prefix)
    save_state(store, state)
    return state


def device_outcome(
    progress: DeviceProgress, status: Status | None, target: ModelRef
) -> tuple[str, str] | None:
    """("done" | "failed", detail) once the device's status says how the update went."""
    if status is None:
        return None
    model = status.model
    if model is not None and (model.name, model.version) == (target.name, target.version):
        return "done", f"runs v{target.version}"
    update = (status.model_extra or {}).get("last_update")
    if not isinstance(update, dict) or progress.desired_at is None:
        return None
    recent = float(update.get("ts") or 0) >= progress.desired_at - 1.0
    about = str(update.get("source") or f"v{target.version}")
    if recent and update.get("outcome") in _FAILED_OUTCOMES and f"v{target.version}" in about:
        return "failed", str(update.get("message") or update.get("outcome"))
    return None


def abort_reason(state: RolloutState, watch: FleetWatch) -> str | None:
    t = state.thresholds
    touched = [d for d in state.devices if d.state in ("updating", "done", "failed")]
    failed = [d for d in touched if d.state == "failed"]
    if failed and 100.0 * len(failed) / len(touched) > t.abort_failure_rate:
        return (
            f"{len(failed)} of {len(touched)} updated devices failed "
            f"(over {t.abort_failure_rate:g}%): {failed[0].device}: {failed[0].detail}"
        )
    names = [d.device for d in state.devices if d.state == "done"]
    new = watch.version_stats(names, state.version, same=True)
    if new.count >= t.min_inferences:
        rate = 100.0 * new.errors / new.count
        if rate > t.abort_failure_rate:
            return f"inference error rate on v{state.version} is {rate:.1f}% (over {t.abort_failure_rate:g}%)"
        old = watch.version_stats([d.device for d in state.devices], state.version, same=False)
        if new.p99_ms is not None and old.p99_ms:
            ratio = new.p99_ms / old.p99_ms
            if ratio > t.abort_p99_ratio:
                return (
                    f"p99 on v{state.version} is {new.p99_ms:.1f} ms, {ratio:.2f}x the previous "
                    f"{old.p99_ms:.1f} ms (over {t.abort_p99_ratio:g}x)"
                )
    return None


class Rollout:
    def __init__(
        self,
        store: ObjectStore,
        watch: FleetWatch,
        state: RolloutState,
        *,
        timeout_s: float = 600.0,
        wait_all: bool = False,
        poll_s: float = 0.25,
        on_progress: Callable[[RolloutState], None] | None = None,
    ) -> None:
        self.store, self.watch, self.state = store, watch, state
        self.timeout_s, self.wait_all, self.poll_s = timeout_s, wait_all, poll_s
        self.on_progress = on_progress or (lambda _state: None)
        self.target = ModelRef(name=state.name, version=state.version)

    def _save(self) -> None:
        save_state(self.store, self.state)
        self.on_progress(self.state)

    def _online(self, device: str) -> bool:
        status = self.watch.statuses.get(device)
        return status is not None and status.state == "online"

    def _start_wave(self, index: int) -> None:
        for progress in self.state.wave(index):
            if progress.state in ("pending", "offline", "updating"):
                desired = Desired(model=self.target, rollout=self.state.id)
                self.watch.set_desired(progress.device, desired)
                progress.desired_at = progress.desired_at or desired.ts
                progress.state = "updating" if self._online(progress.device) else "offline"
        self._save()

    def _observe(self) -> bool:
        """Fold the latest statuses into the state; True when something changed."""
        changed = False
        for progress in self.state.devices:
            if progress.state not in ("updating", "offline"):
                continue
            outcome = device_outcome(
                progress, self.watch.statuses.get(progress.device), self.target
            )
            if outcome is not None:
                progress.state, progress.detail = outcome  # type: ignore[assignment]
                changed = True
            elif progress.state == "offline" and self._online(progress.device):
                progress.state, changed = "updating", True
        if changed:
            self._save()
        return changed

    def _wave_settled(self, index: int) -> bool:
        return all(d.state in ("done", "failed", "offline") for d in self.state.wave(index))

    def run(self) -> RolloutState:
        deadline = time.monotonic() + self.timeout_s
        while self.state.phase == "running":
            index = self.state.current_wave
            if index >= self.state.wave_count:
                self._finish(deadline)
                break
            self._start_wave(index)
            while not self._wave_settled(index) and time.monotonic() < deadline:
                self._observe()
                if (reason := abort_reason(self.state, self.watch)) is not None:
                    return self.abort(reason)
                self.watch.wait(self.poll_s)
            self._observe()
            for progress in self.state.wave(index):
                if progress.state == "updating":  # online, yet silent until the deadline
                    progress.state = "failed"
                    progress.detail = f"did not report v{self.state.version} in {self.timeout_s:g}s"
            if (reason := self._bake(index, deadline)) is not None:
                return self.abort(reason)
            self.state.current_wave += 1
            self._save()
        return self.state

    def _bake(self, index: int, deadline: float) -> str | None:
        """Watch the fleet for ``bake_s`` after a wave, then give the abort reason, if any.

        A device reports the new version as soon as it passed its health check, before it served
        any traffic: without this wait the error-rate and p99 checks would see no inference on
        the new version, and a slow or failing model would reach every wave.
        """
        baking = any(d.state == "done" for d in self.state.wave(index))
        until = min(deadline, time.monotonic() + (self.state.thresholds.bake_s if baking else 0))
        while (reason := abort_reason(self.state, self.watch)) is None:
            if time.monotonic() >= until:
                break
            self.watch.wait(self.poll_s)
        return reason

    def _finish(self, deadline: float) -> None:
        while self.wait_all and time.monotonic() < deadline:
            self._observe()
            if all(d.state == "done" for d in self.state.devices):
                break
            self.watch.wait(self.poll_s)
        self._observe()
        waiting = [d.device for d in self.state.devices if d.state != "done"]
        if self.wait_all and waiting:
            self.state.phase = "timed_out"
            self.state.reason = (
                f"not on v{self.state.version} after {self.timeout_s:g}s: {', '.join(waiting)}"
            )
        else:
            self.state.phase = "completed"
            if waiting:
                self.state.reason = f"offline, will catch up on connect: {', '.join(waiting)}"
        self._save()

    def abort(self, reason: str) -> RolloutState:
        """Set every touched device back to what it ran before, and wait for it to get there."""
        log.warning("rollout %s aborted: %s", self.state.id, reason)
        self.state.phase, self.state.reason = "aborted", reason
        touched = [d for d in self.state.devices if d.state != "pending"]
        for progress in touched:
            back = None
            if progress.previous is not None:
                back = Desired(model=progress.previous, rollout=self.state.id, rollback=True)
            self.watch.set_desired(progress.device, back)
        self._save()
        deadline = time.monotonic() + ROLLBACK_WAIT_S
        while time.monotonic() < deadline:
            pending = [d for d in touched if d.state != "rolled_back"]
            for progress in pending:
                self._check_rolled_back(progress)
            if all(d.state == "rolled_back" or not self._online(d.device) for d in touched):
                break
            self.watch.wait(self.poll_s)
        self._save()
        return self.state

    def _check_rolled_back(self, progress: DeviceProgress) -> None:
        status = self.watch.statuses.get(progress.device)
        running = status.model if status is not None else None
        prev = progress.previous
        if prev is None or (
            running is not None and (running.name, running.version) == (prev.name, prev.version)
        ):
            progress.state, progress.detail = (
                "rolled_back",
                f"runs v{prev.version}" if prev else "nothing to go back to",
            )
            return
