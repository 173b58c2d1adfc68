"""The shadow phase of a rollout (``edgebento rollout --shadow``): before a wave is switched,
its devices run the new version beside the current one on live inputs, and the wave is switched
only if their figures pass.

For each wave, before its desired state is pushed: a ``shadow`` command (``start``) to each of
its devices; then, for ``for_s``, the figures each device reports in its status
(``cloud_sync.shadow_figures``) are read and judged per device: its agreement, its error rate
and its run time against the live model's, once it ran ``min_samples`` times. A device's figures
count only if they name this version and are bounded by what it can have run since the command,
at the rate asked for (plus a few seconds of slack); a device past that is a suspect and counts
for nothing.

The wave's verdict must survive leaving out any one judged device, so that one liar can neither
carry nor block it: ``abort`` when, without any one device, at least ``min_devices`` are judged
and at least ``abort_share`` of them fail (as soon as that holds: a broken version aborts
early); ``pass`` when, without any one device, at least ``min_devices`` are judged and fewer
than ``abort_share`` fail, once ``for_s`` is over. A wave that reaches neither by ``for_s`` and
its wave timeout aborts as not verified. Devices judged in earlier waves keep counting, so a
small canary is judged with the rest.

Either way every shadow is stopped (its copy removed); on an abort no device of the wave was
ever sent the new version, so none served it. Each device's figures stay in the rollout state
(``DeviceProgress.shadow``), signed with it, for ``edgebento rollout status``.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import ShadowCommand
from cloud_sync.rollout_checks import wave_label
from cloud_sync.rollout_host import ShadowHost
from cloud_sync.rollout_state import AbortFigures, DeviceProgress
from cloud_sync.shadow_figures import ShadowFigures, ShadowSettings, Verdict, device_verdict
from modelpack.errors import BrokerError

log = logging.getLogger(__name__)
SLACK_S = 5.0  # runs a device may have done beyond rate x time: clocks and the first sample
SAY_EVERY_S = 10.0


class ShadowPhase:
    def __init__(self, rollout: ShadowHost, settings: ShadowSettings) -> None:
        self.rollout, self.settings = rollout, settings
        self.started: dict[str, float] = {}  # device -> when its start was sent (monotonic)
        self.verdicts: dict[str, tuple[Verdict, str]] = {}
        self.suspects: dict[str, str] = {}
        self._said = 0.0

    # --- commands --------------------------------------------------------------------------

    def _send(self, devices: list[str], action: str) -> None:
        r, s = self.rollout, self.settings
        pending = []
        for device in devices:
            command = ShadowCommand(
                id=f"shadow-{r.state.id}-{uuid.uuid4().hex[:8]}",
                action=action,  # type: ignore[arg-type]
                name=r.state.name if action == "start" else None,
                version=r.state.version if action == "start" else None,
                rate=s.rate,
                for_s=s.for_s,
            )
            topic = r.watch.topics.cmd(device, "shadow")
            payload = command.model_dump_json(exclude_none=True).encode()
            pending.append((device, r.watch.client.client.publish(topic, payload, 1, False)))
        for device, info in pending:
            try:
                info.wait_for_publish(timeout=30)
            except (RuntimeError, ValueError) as exc:
                raise BrokerError(f"publishing the shadow {action} of {device}: {exc}") from exc

    # --- judging ---------------------------------------------------------------------------

    def _read(self, device: str, now: float) -> ShadowFigures | None:
        """A device's figures of this version, if any and possible."""
        status = self.rollout.watch.statuses.get(device)
        if status is None or not status.shadow or device in self.suspects:
            return None
        try:
            figures = ShadowFigures.model_validate(status.shadow)
        except ValidationError:
            self.suspects[device] = "its shadow figures do not parse"
            return None
        r = self.rollout.state
        if (figures.model.name, figures.model.version) != (r.name, r.version):
            return None  # an older shadow's figures
        runs = figures.samples + figures.errors + figures.busy
        can = self.settings.rate * (now - self.started[device] + SLACK_S) + 1
        if runs > can:
            self.suspects[device] = f"{runs} shadow runs where at most {can:.0f} were possible"
            return None
        return figures

    def _judge(self, devices: list[str], now: float) -> Verdict:
        r = self.rollout
        for device in devices:
            figures = self._read(device, now)
            if figures is None:
                continue
            verdict = device_verdict(figures, self.settings)
            self.verdicts[device] = verdict
            progress = r.state.get(device)
            if progress is not None:
                shown = {**figures.model_dump(mode="json", exclude_none=True)}
                shown.update(verdict=verdict[0], why=verdict[1], line=figures.line())
                if getattr(progress, "shadow", None) != shown:
                    progress.shadow = shown  # type: ignore[attr-defined]  # extra field
                    r.state.touch(progress)
        return self._robust()

    def _robust(self) -> Verdict:
        """The verdict that holds with any one judged device left out, else pending."""
        judged = {
            d: v for d, (v, _) in self.verdicts.items() if v != "pending" and d not in self.suspects
        }
        n, failing = len(judged), sum(v == "fail" for v in judged.values())
        if n - 1 < self.settings.min_devices:
            return "pending"
        without = {failing - 1 if v == "fail" else failing for v in judged.values()}
        shares = [f / (n - 1) for f in without]
        if all(share >= self.settings.abort_share for share in shares):
            return "fail"
        if all(share < self.settings.abort_share for share in shares):
            return "pass"
        return "pending"

    def _figures(self) -> AbortFigures:
        judged = [v for d, (v, _) in self.verdicts.items() if v != "pending"]
        return AbortFigures(
            touched=len(self.started),
            reporting=len(judged),
            bad=judged.count("fail"),
            suspects=len(self.suspects),
        )

    def _summary(self) -> str:
        judged = [(d, v, why) for d, (v, why) in sorted(self.verdicts.items()) if v != "pending"]
        bad = [f"{d}: {why}" for d, v, why in judged if v == "fail"]
        head = f"{len(judged)} devices judged, {len(bad)} failing"
        shown = "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        suspects = f"; {len(self.suspects)} suspect" if self.suspects else ""
        return f"{head}{suspects}" + (f" ({shown})" if shown else "")

    # --- the phase -------------------------------------------------------------------------

    def run(self, index: int) -> tuple[str, AbortFigures] | None:
        """Shadow wave ``index``; the abort reason and figures when it must not switch."""
        r, s = self.rollout, self.settings
        wave = [p for p in r.state.wave(index) if p.state == "pending"]
        if not wave:
            return None  # a resumed wave already pushed: nothing left to shadow
        devices = [p.device for p in wave]
        self._send(devices, "start")
        now = time.monotonic()
        self.started.update(dict.fromkeys(devices, now))
        label = wave_label(r.state, index)
        r.say(f"{label}: shadowing v{r.state.version} on {len(devices)} device(s) for {s.for_s:g}s")
        until = now + s.for_s
        last = until + r.state.thresholds.wave_timeout_s
        shadowed = list(self.started)
        try:
            while True:
                r._drain()
                now = time.monotonic()
                verdict = self._judge(shadowed, now)
                if verdict == "fail":
                    return self._abort(label, f"the shadow of v{r.state.version} failed")
                if verdict == "pass" and now >= until:
                    r.say(f"{label}: shadow passed: {self._summary()}")
                    r._save(force=True)
                    return None
                if now >= last:
                    return self._abort(label, f"the shadow of v{r.state.version} not verified")
                if now - self._said >= SAY_EVERY_S:
                    self._said = now
                    r.say(f"{label}: shadow: {self._summary()}; {max(0, until - now):.0f}s left")
                r._tick()
                r.watch.wait(min(r.poll_s, max(0.01, until - now)))
        finally:
            try:
                self._send(devices, "stop")
            except BrokerError as exc:  # a device left shadowing stops by itself (2 x for_s)
                log.warning("shadows not stopped: %s", exc)

    def _abort(self, label: str, head: str) -> tuple[str, AbortFigures]:
        reason = f"{head} on {label}: {self._summary()}; no device switched"
        self.rollout.say(f"{label}: {reason}")
        return reason, self._figures()


def shadow_lines(devices: list[DeviceProgress]) -> list[str]:
    """What ``edgebento rollout status`` prints of the shadows: per wave, then per device."""
    lines: list[str] = []
    by_wave: dict[int, list[dict[str, Any]]] = {}
    for d in devices:
        shown = getattr(d, "shadow", None)
        if isinstance(shown, dict):
            by_wave.setdefault(d.wave, []).append({"device": d.device, **shown})
    for wave, rows in sorted(by_wave.items()):
        failing = sum(row.get("verdict") == "fail" for row in rows)
        name = "canary" if wave == 0 else f"wave {wave}"
        lines.append(f"shadow {name}: {len(rows)} device(s), {failing} failing")
        lines.extend(
            f"  {row['device']}: {row.get('verdict', '?')}: {row.get('line', '')}" for row in rows
        )
    return lines
