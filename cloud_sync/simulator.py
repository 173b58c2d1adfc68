"""A simulated edge device: the agent's side of the protocol, without a model to run.

It speaks what a real agent speaks, with the models of ``cloud_sync.protocol``: a retained
``Status`` (with a last will saying ``offline``), a reaction to its retained ``Desired`` that
echoes ``Status.applied`` (generation, rollout, model, outcome), downgrades only on a rollback
instruction signed by a trusted key (``cloud_sync.authority``), telemetry batches of inference
windows whose records leave the outbox only when ``telemetry/ack`` says they are stored.

What it does not do is run a model: an "install" takes ``install_s`` and fails its health check
for the versions in ``fail_versions``; inference windows report ``p99_ms`` and ``error_rate``
per version. ``cloud_sync.sim_fleet`` runs thousands of them, each on its own MQTT connection.

A device can also *lie* (``Behavior.lie``), as a compromised one would on its own topics: each
window then reports the figures given (``ok``, ``errors``, ``p99_ms``) and, with ``version``, names
that model version whatever it runs; a rollout must not be steered by it.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from cloud_sync.protocol import (
    Applied,
    Desired,
    ModelRef,
    ShadowCommand,
    Status,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
    Topics,
)
from modelpack.errors import SignatureError
from modelpack.signing import TrustedKey

OUTBOX_MAX = 1000
RESEND_AFTER_S = 30.0

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain


@dataclass(frozen=True)
class Behavior:
    """How simulated devices act; the same for every device of a fleet."""

    install_s: float = 0.2
    fail_versions: frozenset[int] = frozenset()  # these fail the health check and roll back
    p99_ms: dict[int, float] = field(default_factory=dict)  # per version; default base_p99_ms
    base_p99_ms: float = 5.0
    error_rate: dict[int, float] = field(default_factory=dict)  # per version, 0..1
    telemetry_s: float = 10.0  # 0: no telemetry
    inferences_per_window: int = 20
    groups: tuple[str, ...] = ()
    lie: dict[str, float] = field(default_factory=dict)  # ok, errors, p99_ms, version, ...
    # A shadow's top-1 agreement per version shadowed (default 1): the share of its answers
    # that match the live version's (cloud_sync.rollout_shadow).
    agreement: dict[int, float] = field(default_factory=dict)


# shadow_samples: the shadow runs claimed, each agreeing, however long the shadow ran
LIES = ("ok", "errors", "p99_ms", "version", "shadow_samples")


class SimDevice:
    def __init__(
        self,
        device: str,
        model: ModelRef,
        topics: Topics,
        behavior: Behavior,
        trusted: list[TrustedKey],
        publish: Publish,
        schedule: Callable[[float, Callable[[], None]], None],
    ) -> None:
        self.device, self.model, self.topics = device, model, topics
        self.behavior, self.trusted = behavior, trusted
        self.publish, self.schedule = publish, schedule
        self.boot_id = uuid.uuid4().hex[:12]
        self.highest: dict[str, int] = {model.name: model.version}
        self.rollback_generation = 0  # the highest rollback instruction applied
        self.applied: Applied | None = None
        self.installing: int | None = None  # the generation being installed
        self.seq = 0
        self.outbox: OrderedDict[int, tuple[float, bytes]] = OrderedDict()
        self.acked_once = False
        self.rng = random.Random(device)
        # The shadow: the model, its start and end (inf while it runs), its rate
        self.shadow: tuple[ModelRef, float, float, float] | None = None

    # --- what goes out -----------------------------------------------------------------------

    def status(self, state: str = "online") -> bytes:
        doc = Status.model_validate(
            {
                "device": self.device,
                "state": state,
                "model": self.model,
                "boot_id": self.boot_id,
                "applied": self.applied,
                "groups": list(self.behavior.groups),  # an extra field, as the agent sends it
                "shadow": self._shadow_figures(),
            }
        )
        return doc.model_dump_json(exclude_none=True).encode()

    def _shadow_figures(self) -> dict[str, object] | None:
        """What a shadowing agent reports: runs at its rate since the start, agreeing at the
        behaviour's share for that version."""
        if self.shadow is None:
            return None
        model, since, until, rate = self.shadow
        state = "running" if until == float("inf") else "stopped"
        samples = int(rate * (min(time.monotonic(), until) - since))
        agree = self.behavior.agreement.get(model.version, 1.0)
        if "shadow_samples" in self.behavior.lie:
            samples, agree = int(self.behavior.lie["shadow_samples"]), 1.0
        ms = self.behavior.p99_ms.get(self.model.version, self.behavior.base_p99_ms) * samples
        return {"model": model.model_dump(), "state": state, "metric": "top1",
                "samples": samples, "rows": samples, "agreeing": round(agree * samples, 3),
                "max_abs": 0.0 if agree == 1.0 else 0.5, "shadow_ms": ms, "current_ms": ms}  # fmt: skip

    def on_shadow(self, command: ShadowCommand) -> None:
        if command.action == "start" and command.name and command.version:
            model = ModelRef(name=command.name, version=command.version)
            self.shadow = (model, time.monotonic(), float("inf"), command.rate)
        elif self.shadow is not None:
            model, since, until, rate = self.shadow
            self.shadow = (model, since, min(until, time.monotonic()), rate)
        self.publish(self.topics.status(self.device), self.status(), 1, True)

    def on_connect(self) -> None:
        self.publish(self.topics.status(self.device), self.status(), 1, True)

    def tick_telemetry(self) -> None:
        """One inference window, then resend what waited too long for its acknowledgement."""
        b = self.behavior
        version = self.model.version
        count = b.inferences_per_window
        errors = sum(self.rng.random() < b.error_rate.get(version, 0.0) for _ in range(count))
        p99 = b.p99_ms.get(version, b.base_p99_ms) * (0.9 + 0.2 * self.rng.random())
        data: dict[str, object] = {
            "ok": count - errors,
            "errors": errors,
            "p99_ms": round(p99, 3),
            "window_s": b.telemetry_s,
            "model": {"name": self.model.name, "version": version},
        }
        for key, value in b.lie.items():
            if key == "version":
                data["model"] = {"name": self.model.name, "version": int(value)}
            else:
                data[key] = int(value) if key != "p99_ms" and value == int(value) else value
        record = TelemetryRecord(
            device=self.device,
            boot_id=self.boot_id,
            seq=self.seq,
            ts=time.time(),
            kind="inference",
            data=data,
        )
        body = TelemetryBatch(records=[record]).model_dump_json().encode()
        self.outbox[self.seq] = (time.monotonic(), body)
        self.seq += 1
        while len(self.outbox) > OUTBOX_MAX:
            self.outbox.popitem(last=False)  # bounded: the oldest goes first
        self.publish(self.topics.telemetry(self.device), body, 1, False)
        if self.shadow is not None and self.shadow[2] == float("inf"):  # running: fresh figures
            self.publish(self.topics.status(self.device), self.status(), 1, True)
        if self.acked_once:  # an ingestion is listening: what it missed goes again
            cutoff = time.monotonic() - RESEND_AFTER_S
            for seq, (sent, old) in list(self.outbox.items())[:10]:
                if sent < cutoff:
                    self.outbox[seq] = (time.monotonic(), old)
                    self.publish(self.topics.telemetry(self.device), old, 1, False)

    # --- what comes in -----------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self.topics.desired(self.device):
                if payload:
                    self.on_desired(Desired.model_validate_json(payload))
            elif topic == self.topics.telemetry_ack(self.device):
                self.on_ack(TelemetryAck.model_validate_json(payload))
            elif topic == self.topics.cmd(self.device, "shadow"):
                self.on_shadow(ShadowCommand.model_validate_json(payload))
        except ValidationError:
            return  # a real agent reports this; the simulator only must not fall over

    def on_ack(self, ack: TelemetryAck) -> None:
        if ack.boot_id != self.boot_id:
            return
        self.acked_once = True
        for seq in [s for s in self.outbox if s <= ack.seq]:
            del self.outbox[seq]

    def _answer(self, desired: Desired, outcome: str, reason: str | None = None) -> None:
        self.applied = Applied(
            generation=desired.generation,
            rollout=desired.rollout,
            model=ModelRef(name=desired.model.name, version=desired.model.version),
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
        )
        self.publish(self.topics.status(self.device), self.status(), 1, True)

    def on_desired(self, desired: Desired) -> None:
        if self.applied is not None and (
            (self.applied.generation, self.applied.rollout) == (desired.generation, desired.rollout)
        ):
            return  # acted on this one already (a retained repeat)
        if self.installing == desired.generation:
            return
        target = desired.model
        if (target.name, target.version) == (self.model.name, self.model.version):
            self._answer(desired, "installed")
            return
        if target.version <= self.highest.get(target.name, 0):
            if not desired.rollback or desired.authorization is None:
                self._answer(desired, "refused", "not newer than installed; no signed rollback")
                return
            from cloud_sync.authority import verify_rollback

            try:
                instruction = verify_rollback(
                    desired.authorization,
                    self.trusted,
                    self.device,
                    target,
                    applied_generation=self.rollback_generation,
                    runs=self.model,
                )
            except SignatureError as exc:
                self._answer(desired, "refused", str(exc))
                return
            self.rollback_generation = instruction.generation  # spent, as an agent does
        self.installing = desired.generation
        self.schedule(self.behavior.install_s, lambda: self._installed(desired))

    def _installed(self, desired: Desired) -> None:
        self.installing = None
        target = desired.model
        if target.version in self.behavior.fail_versions and not desired.rollback:
            self._answer(desired, "rolled_back", "health check failed: golden samples differ")
            return
        self.model = ModelRef(name=target.name, version=target.version)
        self.highest[target.name] = max(self.highest.get(target.name, 0), target.version)
        self._answer(desired, "installed")
