"""A rollout's plan and progress, persisted in the store at ``rollouts/{id}.json``.

Saved after every step, so ``edgebento rollout status ID`` shows where it is and a restarted
``edgebento rollout resume ID`` carries on from there.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.protocol import ModelRef
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, NotFoundError, StoreError

DeviceState = Literal["pending", "updating", "offline", "done", "failed", "rolled_back"]
Phase = Literal["running", "completed", "aborted", "timed_out"]


class DeviceProgress(BaseModel):
    model_config = ConfigDict(extra="allow")
    device: str
    wave: int
    previous: ModelRef | None = None
    state: DeviceState = "pending"
    detail: str | None = None
    desired_at: float | None = None


class Thresholds(BaseModel):
    canary_pct: float = Field(default=10.0, gt=0, le=100)
    waves: int = Field(default=2, ge=1)
    abort_failure_rate: float = Field(default=5.0, ge=0, le=100)  # % of devices or inferences
    abort_p99_ratio: float = Field(default=1.5, gt=0)  # new p99 over the previous version's
    min_inferences: int = Field(default=50, ge=1)  # fewer say nothing about error rates
    bake_s: float = Field(default=60.0, ge=0)  # watch each wave's telemetry this long


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: int = 1
    id: str
    name: str
    version: int
    prefix: str = "edgebento"
    phase: Phase = "running"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    current_wave: int = 0
    devices: list[DeviceProgress]
    reason: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @property
    def wave_count(self) -> int:
        return max((d.wave for d in self.devices), default=-1) + 1

    def wave(self, index: int) -> list[DeviceProgress]:
        return [d for d in self.devices if d.wave == index]

    def touched(self) -> list[DeviceProgress]:
        return [d for d in self.devices if d.state != "pending"]

    def device(self, name: str) -> DeviceProgress:
        return next(d for d in self.devices if d.device == name)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            out[d.state] = out.get(d.state, 0) + 1
        return out


def plan_waves(devices: list[str], canary_pct: float, waves: int) -> list[list[str]]:
    """The canary (at least one device) first, then the rest in ``waves`` near-equal waves."""
    ordered = sorted(dict.fromkeys(devices))
    if not ordered:
        raise ConfigError("a rollout needs at least one target device")
    canary = max(1, math.ceil(len(ordered) * canary_pct / 100))
    plan = [ordered[:canary]]
    rest = ordered[canary:]
    size = math.ceil(len(rest) / waves) if rest else 0
    plan += [rest[i : i + size] for i in range(0, len(rest), size)] if size else []
    return plan


def new_rollout(
    name: str,
    version: int,
    devices: list[str],
    previous: dict[str, ModelRef | None],
    thresholds: Thresholds,
    prefix: str,
) -> RolloutState:
    progress = [
        DeviceProgress(device=d, wave=i, previous=previous.get(d))
        for i, wave in enumerate(plan_waves(devices, thresholds.canary_pct, thresholds.waves))
        for d in wave
    ]
    rollout_id = f"{name}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return RolloutState(
        id=rollout_id,
        name=name,
        version=version,
        prefix=prefix,
        thresholds=thresholds,
        devices=progress,
    )


def rollout_key(rollout_id: str) -> str:
    if "/" in rollout_id or rollout_id.startswith("."):
        raise ConfigError(f"{rollout_id!r} is not a rollout id")
    return f"rollouts/{rollout_id}.json"


def save_state(store: ObjectStore, state: RolloutState) -> None:
    state.updated_at = time.time()
    store.put_bytes(rollout_key(state.id), state.model_dump_json(indent=2).encode())


def load_state(store: ObjectStore, rollout_id: str) -> RolloutState:
    try:
        data = store.get_bytes(rollout_key(rollout_id))
    except NotFoundError as exc:
        raise NotFoundError(f"no rollout {rollout_id} in {store.url}") from exc
    try:
        return RolloutState.model_validate_json(data)
    except ValidationError as exc:
        raise StoreError(f"rollout {rollout_id} in {store.url} is not a valid state") from exc


def list_states(store: ObjectStore) -> list[RolloutState]:
    ids = [k.removeprefix("rollouts/").removesuffix(".json") for k in store.list("rollouts/")]
    return sorted((load_state(store, i) for i in ids), key=lambda s: s.created_at)
