"""A rollout's plan and progress: the waves, each device's state, the thresholds and the verdicts.

``new_rollout`` plans the waves (the canary first); ``RolloutState`` keeps the counts per device
state and per wave as devices move, and marks the waves that changed since the last save.
``Rollout`` throttles device-level saves and forces one at every phase change. The store's
layout, the saves and the loads are ``cloud_sync.rollout_store``. ``edgebento rollout status ID``
reads a state, and ``edgebento rollout resume ID`` carries on from it.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PrivateAttr

from cloud_sync.protocol import ModelRef
from cloud_sync.rollout_record import SaveRecord
from cloud_sync.shadow_figures import ShadowSettings
from modelpack.errors import ConfigError

# What an agent's config accepts as a device id (edge_agent.config): one topic level, no MQTT
# wildcard, so every device has its own status, desired and telemetry topics.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_device_ids(devices: list[str]) -> list[str]:
    bad = next((d for d in devices if not DEVICE_ID.fullmatch(d)), None)
    if bad is not None:
        raise ConfigError(
            f"device id {bad!r} must be 1-64 of A-Z a-z 0-9 _ . - (one topic level, as an agent's)"
        )
    return devices


DeviceState = Literal["pending", "unknown", "updating", "offline", "done", "failed", "rolled_back"]
# "unverified": a wave whose health could not be judged (too few devices reported enough
# inferences before its deadline); the rollout stops there unless ``allow_unverified``.
Phase = Literal["running", "aborting", "aborted", "completed", "timed_out", "unverified"]
SCHEMA_VERSION = 2
WAITING: tuple[str, ...] = ("unknown", "updating")  # a wave is settled when none of it waits


class DeviceProgress(BaseModel):
    model_config = ConfigDict(extra="allow")
    device: str
    wave: int
    previous: ModelRef | None = None
    state: DeviceState = "pending"
    detail: str | None = None


class Thresholds(BaseModel):
    canary_pct: float = Field(default=10.0, gt=0, le=100)
    waves: int = Field(default=2, ge=1)
    abort_failure_rate: float = Field(default=5.0, ge=0, le=100)  # % of devices; a device's %
    abort_p99_ratio: float = Field(default=1.5, gt=0)  # a device's new p99 over its previous one
    min_inferences: int = Field(default=50, ge=1)  # per device: fewer say nothing about it
    min_devices: int = Field(default=1, ge=1)  # reporting devices before a verdict on telemetry
    abort_device_share: float = Field(default=25.0, ge=0, le=100)  # % of reporting devices bad
    max_device_rate: float = Field(default=10_000.0, gt=0)  # inferences/s a device can serve
    allow_unverified: bool = False  # go on past a wave whose health could not be judged
    bake_s: float = Field(default=60.0, ge=0)  # watch each wave's telemetry this long
    wave_timeout_s: float = Field(default=300.0, gt=0)  # for every device of a wave to report
    rollback_wait_s: float = Field(default=60.0, ge=0)  # for the touched devices to go back
    shadow: ShadowSettings | None = None  # run each wave's shadow first (rollout_shadow)
    drift_gate_psi: float | None = Field(default=None, gt=0)  # rollout_drift_gate


class AbortFigures(BaseModel):
    """What the controller saw at its last check: behind an abort (persisted before any
    rollback), or behind a wave's verdict. Telemetry is judged per device: ``reporting`` devices
    ran the new version with at least ``min_inferences``, ``bad`` ones of them were over a
    threshold, ``suspects`` reported what no device can serve; the sums and medians are over
    the reporting devices, for the record, never the basis of a verdict."""

    failed: int = 0
    touched: int = 0
    reporting: int = 0
    bad: int = 0
    suspects: int = 0
    inferences: float = 0.0
    errors: float = 0.0
    error_rate_pct: float | None = None
    new_p99_ms: float | None = None
    old_p99_ms: float | None = None


class WaveCheck(BaseModel):
    """A wave's health verdict: ``verified`` once enough devices reported enough inferences
    and too few of them were over a threshold."""

    wave: int
    verified: bool
    figures: AbortFigures
    detail: str


class SaveStats(BaseModel):
    # Wall time (loaded, mostly the wait for a CPU) beside the saving thread's CPU time; the
    # store requests: a conditional write per changed wave and one for the header.
    count: int = 0
    bytes: int = 0
    requests: int = 0
    max_ms: float = 0.0
    total_ms: float = 0.0
    max_cpu_ms: float = 0.0
    total_cpu_ms: float = 0.0


class RolloutHeader(BaseModel):
    """``rollouts/{id}.json``: everything but the per-device progress."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    id: str
    name: str
    version: int
    prefix: str = "edgebento"
    phase: Phase = "running"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    current_wave: int = 0
    wave_count: int = 0
    generation: int = Field(default=1, ge=1)  # Desired.generation of the update
    reason: str | None = None
    figures: AbortFigures | None = None
    checks: list[WaveCheck] = Field(default_factory=list)  # one per judged wave, in order
    suspects: dict[str, str] = Field(default_factory=dict)  # device -> why (the first 100)
    first_failure: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    saves: SaveStats = Field(default_factory=SaveStats)
    save_seq: NonNegativeInt = 0  # the last save's sequence number (0: stored before them)
    wave_seqs: list[NonNegativeInt] = Field(default_factory=list)  # per wave, as last written
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @property
    def rollback_generation(self) -> int:
        return self.generation + 1

    @property
    def verified(self) -> bool:
        """Every wave judged so far passed its health checks."""
        return all(check.verified for check in self.checks)


class WaveDoc(BaseModel):
    """``rollouts/{id}/wave-{n}.json``."""

    schema_version: int = SCHEMA_VERSION
    rollout: str
    wave: int
    seq: NonNegativeInt = 0  # the save that wrote it (0: stored before sequences)
    devices: list[DeviceProgress]


class RolloutState(RolloutHeader):
    """The header and every device's progress, with counts kept as devices move."""

    devices: list[DeviceProgress]
    _index: dict[str, DeviceProgress] = PrivateAttr(default_factory=dict)
    _waves: list[list[DeviceProgress]] = PrivateAttr(default_factory=list)
    _dirty: set[int] = PrivateAttr(default_factory=set)
    _waiting: list[int] = PrivateAttr(default_factory=list)
    _failed: list[int] = PrivateAttr(default_factory=list)  # per wave: its failed devices
    # The etag of each document as this controller last wrote or read it: every save is
    # conditional on it, so a controller that lost the lease cannot overwrite its successor.
    _etags: dict[str, str] = PrivateAttr(default_factory=dict)
    # Where each save's sequence is recorded outside the bucket (rollout_record), if anywhere.
    _record: SaveRecord | None = PrivateAttr(default=None)

    def model_post_init(self, _context: object) -> None:
        self.wave_count = max((d.wave for d in self.devices), default=-1) + 1
        self._index = {d.device: d for d in self.devices}
        self._waves = [[] for _ in range(self.wave_count)]
        self._waiting = [0] * self.wave_count
        self._failed = [0] * self.wave_count
        counts: dict[str, int] = {}
        for d in self.devices:
            self._waves[d.wave].append(d)
            counts[d.state] = counts.get(d.state, 0) + 1
            self._waiting[d.wave] += d.state in WAITING
            self._failed[d.wave] += d.state == "failed"
        self.counts = counts

    def wave(self, index: int) -> list[DeviceProgress]:
        return self._waves[index] if 0 <= index < self.wave_count else []

    def get(self, name: str) -> DeviceProgress | None:
        return self._index.get(name)

    def device(self, name: str) -> DeviceProgress:
        return self._index[name]

    def move(self, progress: DeviceProgress, state: DeviceState, detail: str | None) -> None:
        """Change one device's state, keeping the counts and marking its wave for the save."""
        if progress.state == state and progress.detail == detail:
            return
        self.counts[progress.state] -= 1
        self.counts[state] = self.counts.get(state, 0) + 1
        self._waiting[progress.wave] += (state in WAITING) - (progress.state in WAITING)
        self._failed[progress.wave] += (state == "failed") - (progress.state == "failed")
        progress.state, progress.detail = state, detail
        if state == "failed" and self.first_failure is None:
            self.first_failure = f"{progress.device}: {detail}"
        self._dirty.add(progress.wave)

    def touch(self, progress: DeviceProgress) -> None:
        """Mark a device's wave for the next save (its ``previous`` changed)."""
        self._dirty.add(progress.wave)

    def waiting(self, index: int) -> int:
        """Devices of wave ``index`` not yet judged (no status, or updating)."""
        return self._waiting[index] if 0 <= index < self.wave_count else 0

    def failed(self, index: int) -> int:
        """Devices of wave ``index`` whose update failed."""
        return self._failed[index] if 0 <= index < self.wave_count else 0

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def count(self, *states: str) -> int:
        return sum(self.counts.get(s, 0) for s in states)

    def take_dirty(self) -> set[int]:
        dirty, self._dirty = self._dirty, set()
        return dirty


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
    generation: int = 1,
    record: SaveRecord | None = None,
) -> RolloutState:
    progress = [
        DeviceProgress(device=d, wave=i, previous=previous.get(d))
        for i, wave in enumerate(plan_waves(devices, thresholds.canary_pct, thresholds.waves))
        for d in wave
    ]
    rollout_id = f"{name}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    state = RolloutState(
        id=rollout_id,
        name=name,
        version=version,
        prefix=prefix,
        thresholds=thresholds,
        devices=progress,
        generation=generation,
    )
    state._dirty = set(range(state.wave_count))
    state._record = record
    return state
