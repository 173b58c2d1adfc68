"""Staged rollouts: desired state wave by wave, judged by what devices report, and rolled back
with signed instructions when the fleet says so.

Import path and API::

    from cloud_sync.rollout import Rollout
    state = Rollout(store, watch, state, signer=private_key, timeout_s=None).run()

Each target gets a retained ``Desired`` on ``{prefix}/{device}/desired`` carrying the rollout id
and ``generation``: the canary first, then the waves. A device's outcome is read from structured
fields only: its status runs the target version, or its ``Status.applied`` echoes this rollout,
this generation and this model with the outcome. Never a clock, never message text.

Every wave has its own deadline (``wave_timeout_s``) and is pushed only if the time left of
``timeout_s`` can judge it (``wave_timeout_s + bake_s``); otherwise the rollout stops as
``timed_out`` before pushing, and ``resume`` carries on. Statuses are collected until the
wave's deadline: a device not heard from holds its wave until then, and a device whose previous
version was unknown at the start takes it from the first status it sends.

A wave is judged (``cloud_sync.rollout_checks``) after its bake; without enough figures the
controller waits for them up to the wave's timeout and bake, counted from its push. A wave that
still cannot be judged stops the rollout as ``unverified`` (never ``completed``), unless
``allow_unverified``, which goes on and records the wave as not verified. Each step of a wave is
said in one line (``say``).

An abort is written ahead: ``aborting``, with the reason and the figures, is saved before any
rollback is published; a controller that dies in the middle is resumed into finishing the abort.
Each rollback is a signed desired state (``cloud_sync.rollout_abort``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cloud_sync.protocol import Desired, ModelRef
from cloud_sync.rollout_abort import Published, fold_rollback, rollback_desired
from cloud_sync.rollout_checks import (
    abort_reason,
    device_outcome,
    judge,
    same,
    unverified_reason,
    wave_label,
    wave_line,
)
from cloud_sync.rollout_drift_gate import DriftGate
from cloud_sync.rollout_shadow import ShadowPhase
from cloud_sync.rollout_state import AbortFigures, DeviceProgress, RolloutState, WaveCheck
from cloud_sync.rollout_store import save_state
from cloud_sync.store import ObjectStore
from cloud_sync.watch import FleetWatch

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud_sync.lease import Lease

log = logging.getLogger(__name__)
_WAITING = ("unknown", "updating", "offline")
_STATS_EVERY_S = 0.5  # the telemetry figures change slowly; the device counts are exact
_SAY_EVERY_S = 10.0  # a progress line while a wave bakes or waits for figures


class Rollout:
    def __init__(
        self,
        store: ObjectStore,
        watch: FleetWatch,
        state: RolloutState,
        *,
        signer: Ed25519PrivateKey,
        timeout_s: float | None = None,
        wait_all: bool = False,
        poll_s: float = 0.25,
        save_every_s: float = 1.0,
        lease: Lease | None = None,
        on_progress: Callable[[RolloutState], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.watch, self.state = store, watch, state
        self.signer, self.lease = signer, lease
        self.deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        self.timeout_s, self.wait_all, self.poll_s = timeout_s, wait_all, poll_s
        self.save_every_s = save_every_s
        self.on_progress = on_progress or (lambda _state: None)
        self.say = say or (lambda line: log.info("%s", line))
        self._wave_started = 0.0
        self._said_at = 0.0
        watch.max_rate = state.thresholds.max_device_rate
        self.target = ModelRef(name=state.name, version=state.version)
        self._saved_at = 0.0
        self._stats_at = 0.0
        self._refused: set[str] = set()  # devices that answered a rollback with a refusal
        self._published = Published(store)
        shadow = state.thresholds.shadow
        self.shadow = ShadowPhase(self, shadow) if shadow is not None else None
        gate = state.thresholds.drift_gate_psi
        self.drift_gate = DriftGate(store, gate) if gate is not None else None

    # --- bookkeeping -----------------------------------------------------------------------

    def _save(self, force: bool = False) -> None:
        """Phase changes are saved at once (``force``); device progress at most every
        ``save_every_s``, so a fleet reporting at once costs a few saves, not one per device."""
        now = time.monotonic()
        if force or now - self._saved_at >= self.save_every_s:
            if self.lease is not None:
                self.lease.renew(force=force)
            save_state(self.store, self.state, self.signer)
            self._saved_at = now
            self.on_progress(self.state)

    def _tick(self) -> None:
        if self.lease is not None:
            self.lease.renew()
        if self.state.dirty:
            self._save()

    def _fold(self, progress: DeviceProgress) -> None:
        """One device's latest status into its progress: O(1)."""
        status = self.watch.statuses.get(progress.device)
        if status is None:
            return
        model = self.watch.first_model.get(progress.device) or status.model
        if progress.previous is None and model is not None and not same(model, self.target):
            progress.previous = ModelRef(name=model.name, version=model.version)
            self.state.touch(progress)
        if self.state.phase == "aborting":
            fold_rollback(self.state, progress, status, self._refused)
            return
        if progress.state not in _WAITING:
            return
        outcome = device_outcome(status, self.target, self.state.id, self.state.generation)
        if outcome is not None:
            self.state.move(progress, outcome[0], outcome[1])  # type: ignore[arg-type]
        elif status.state == "online" and progress.state != "updating":
            self.state.move(progress, "updating", None)
        elif status.state == "offline" and progress.state == "unknown":
            self.state.move(progress, "offline", "offline; catches up on connect")

    def _drain(self) -> None:
        for device in self.watch.take_changed():
            progress = self.state.get(device)
            if progress is not None:
                self._fold(progress)

    def _check(self) -> tuple[str, AbortFigures] | None:
        """The device counts on every wakeup; the telemetry figures a few times a second."""
        now = time.monotonic()
        telemetry = now - self._stats_at >= _STATS_EVERY_S
        if telemetry:
            self._stats_at = now
        return abort_reason(self.state, self.watch, telemetry)

    # --- the waves -------------------------------------------------------------------------

    def run(self) -> RolloutState:
        if self.state.phase == "aborting":
            return self._finish_abort()
        for progress in self.state.devices:  # once: what was heard before we started
            self._fold(progress)
        while self.state.phase == "running":
            index = self.state.current_wave
            if index >= self.state.wave_count:
                self._finish()
                break
            if not self._can_judge(index):
                break
            if self.shadow is not None and (found := self.shadow.run(index)) is not None:
                return self._abort(*found)  # before the wave heard of the version
            self._start_wave(index)
            if (found := self._watch_wave(index)) is not None:
                return self._abort(*found)
            if (found := self._bake(index)) is not None:
                return self._abort(*found)
            if self.drift_gate is not None and (found := self.drift_gate.check(self, index)):
                return self._abort(*found)
            verdict = self._verify(index)
            if verdict is not None:
                return self._abort(*verdict)
            if not self.state.checks[-1].verified and not self.state.thresholds.allow_unverified:
                self._stop_unverified(index)
                break
            self.state.current_wave += 1
            self._save(force=True)
        return self.state

    # --- saying how it goes ----------------------------------------------------------------

    def _say_wave(self, index: int, doing: str, force: bool = False) -> None:
        """A line now and then while a wave waits; ``force`` at each step of it."""
        now = time.monotonic()
        if force or now - self._said_at >= _SAY_EVERY_S:
            self._said_at = now
            self.say(wave_line(self.state, index, doing))

    def _left(self) -> float:
        t = self.state.thresholds
        return max(0.0, self._wave_started + t.wave_timeout_s + t.bake_s - time.monotonic())

    def _can_judge(self, index: int) -> bool:
        t = self.state.thresholds
        need = t.wave_timeout_s + t.bake_s
        left = self.deadline - time.monotonic()
        if left >= need:
            return True
        self.state.phase = "timed_out"
        self.state.reason = (
            f"wave {index} not pushed: {max(left, 0):.1f}s left of the {self.timeout_s:g}s "
            f"timeout, and judging a wave takes {need:g}s (wave timeout + bake); resume to go on"
        )
        self._save(force=True)
        return False

    def _start_wave(self, index: int) -> None:
        items = []
        for progress in self.state.wave(index):
            if progress.state in ("pending", *_WAITING):
                desired = Desired(
                    model=self.target, rollout=self.state.id, generation=self.state.generation
                )
                items.append((progress.device, desired))
                if progress.state == "pending":
                    self.state.move(progress, "unknown", None)
                self._fold(progress)
        self._save(force=True)  # the wave is in flight before a device hears of it
        self.watch.set_desired_many(items)
        self._wave_started = time.monotonic()
        self._say_wave(index, f"pushed to {len(items)} device(s)", force=True)

    def _watch_wave(self, index: int) -> tuple[str, AbortFigures] | None:
        wave_deadline = time.monotonic() + self.state.thresholds.wave_timeout_s
        wave = self.state.wave(index)
        while time.monotonic() < wave_deadline:
            self._drain()
            if (found := self._check()) is not None:
                return found
            if self.state.waiting(index) == 0:
                break
            self._say_wave(index, f"{wave_deadline - time.monotonic():.0f}s left to report")
            self._tick()
            self.watch.wait(self.poll_s)
        self._drain()
        timeout = self.state.thresholds.wave_timeout_s
        for progress in wave:
            if progress.state == "updating":  # online, yet silent until the wave's deadline
                self.state.move(
                    progress, "failed", f"did not report v{self.state.version} in {timeout:g}s"
                )
            elif progress.state == "unknown":
                self.state.move(progress, "offline", f"no status heard in {timeout:g}s")
        self._save(force=True)
        found = self._check()
        self._say_wave(index, f"reported; {self._left():.0f}s left to judge it", force=True)
        return found

    def _bake(self, index: int) -> tuple[str, AbortFigures] | None:
        """Watch the fleet for ``bake_s`` after a wave, then give the abort reason, if any.

        A device reports the new version as soon as it passed its health check, before it served
        any traffic: without this wait the error-rate and p99 checks would see no inference on
        the new version, and a slow or failing model would reach every wave.
        """
        baking = any(d.state == "done" for d in self.state.wave(index))
        until = time.monotonic() + (self.state.thresholds.bake_s if baking else 0)
        while time.monotonic() < until:
            self._drain()
            if (found := self._check()) is not None:
                return found
            self._say_wave(index, f"baking, {until - time.monotonic():.0f}s left")
            self._tick()
            self.watch.wait(self.poll_s)
        self._stats_at = 0.0
        return self._check()

    def _verify(self, index: int) -> tuple[str, AbortFigures] | None:
        """The wave's verdict, waiting (up to its wave timeout and bake, counted from its push)
        for enough devices to report enough inferences; with ``allow_unverified``, not waiting.

        Records a ``WaveCheck``; the abort reason when the figures say so, else None.
        """
        wait = not self.state.thresholds.allow_unverified
        while True:
            self._drain()
            if (found := abort_reason(self.state, self.watch, telemetry=False)) is not None:
                return found
            verdict = judge(self.state, self.watch, index)
            self.state.figures = verdict.figures
            if verdict.kind == "abort":
                return verdict.reason, verdict.figures
            if verdict.kind == "verified" or not wait or self._left() <= 0:
                break
            self._say_wave(index, f"{verdict.reason}; waiting {self._left():.0f}s more")
            self._tick()
            self.watch.wait(self.poll_s)
        verified = verdict.kind == "verified"
        detail = verdict.reason if verified else f"not verified: {verdict.reason}"
        self.state.checks = [c for c in self.state.checks if c.wave != index]
        self.state.checks.append(
            WaveCheck(wave=index, verified=verified, figures=verdict.figures, detail=detail)
        )
        self._say_wave(index, detail, force=True)
        return None

    def _stop_unverified(self, index: int) -> None:
        self.state.phase = "unverified"
        self.state.reason = unverified_reason(self.state, index)
        self._save(force=True)

    def _finish(self) -> None:
        while self.wait_all and time.monotonic() < self.deadline:
            self._drain()
            if self.state.count("done") == len(self.state.devices):
                break
            self._tick()
            self.watch.wait(self.poll_s)
        self._drain()
        waiting = [d.device for d in self.state.devices if d.state != "done"]
        shown = ", ".join(waiting[:20]) + (f" and {len(waiting) - 20} more" if waiting[20:] else "")
        if self.wait_all and waiting:
            self.state.phase = "timed_out"
            self.state.reason = f"not on v{self.state.version} in time: {shown}"
        else:
            self.state.phase = "completed"
            notes = []
            if waiting:
                notes.append(f"offline, will catch up on connect: {shown}")
            unchecked = [c.wave for c in self.state.checks if not c.verified]
            if unchecked:
                waves = ", ".join(wave_label(self.state, w) for w in unchecked)
                notes.append(f"health not verified on {waves} (--allow-unverified)")
            self.state.reason = "; ".join(notes) or None
        self._save(force=True)

    # --- the abort -------------------------------------------------------------------------

    def _abort(self, reason: str, figures: AbortFigures) -> RolloutState:
        log.warning("rollout %s aborting: %s", self.state.id, reason)
        self.state.phase, self.state.reason, self.state.figures = "aborting", reason, figures
        self._save(force=True)  # written ahead: a crash from here on resumes into the abort
        return self._finish_abort()

    def _finish_abort(self) -> RolloutState:
        """Set every touched device back to what it ran before, and wait for it to get there.

        Idempotent: every desired state is retained, so a resumed controller publishes the same
        instructions again and a device that acted on them already ignores the repeat.
        """
        touched = [d for d in self.state.devices if d.state != "pending"]
        for progress in touched:
            self._fold(progress)  # a late status may have told us the previous version
        items = []
        for progress in touched:
            # Every touched device, also one already back on its previous version (its update
            # failed): the retained desired state must stop naming the version we abort.
            back = rollback_desired(self.state, progress, self.signer)
            if back is not None and not self._published(back.model):
                why = f"v{back.model.version if back.model else '?'} is not in the registry"
                back = None  # never signed on the word of a document alone
                self.state.move(progress, "failed", f"{why}: no rollback signed")
            items.append((progress.device, back))
            if back is None and progress.state not in ("rolled_back", "failed"):
                # Clearing the desired state keeps an offline device from updating later.
                self.state.move(progress, "rolled_back", "nothing to go back to")
        self.watch.set_desired_many(items)
        until = time.monotonic() + self.state.thresholds.rollback_wait_s
        outstanding = [d for d in touched if d.state != "rolled_back"]
        checked = 0.0
        while outstanding and time.monotonic() < until:
            self._drain()
            if time.monotonic() - checked >= self.poll_s:  # O(outstanding), a few times a second
                checked = time.monotonic()
                outstanding = [
                    d
                    for d in outstanding
                    if d.state != "rolled_back" and d.device not in self._refused
                ]
                if not any(self._online(d) for d in outstanding):
                    break
            self._tick()
            self.watch.wait(self.poll_s)
        self.state.phase = "aborted"
        self._save(force=True)
        return self.state

    def _online(self, progress: DeviceProgress) -> bool:
        status = self.watch.statuses.get(progress.device)
        return status is not None and status.state == "online"
