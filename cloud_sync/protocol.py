"""The device protocol: MQTT topic names and the JSON documents that travel on them.

Both sides import this module: ``edge_agent`` speaks it, ``cloud_sync`` drives it. Every
document carries ``schema_version``. Requests carry an ``id``; the reply goes to the MQTT 5
response topic (with the request's correlation data) or, for MQTT 3.1.1 clients, to the
request's ``reply_to`` field, so a plain ``mosquitto_pub``/``mosquitto_sub`` can drive a device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgebento"
COMMANDS = ("ping", "deploy", "rollback", "config", "capture")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (default ``edgebento``)."""

    prefix: str = DEFAULT_PREFIX

    def cmd(self, device: str, name: str) -> str:
        return f"{self.prefix}/{device}/cmd/{name}"

    def group_cmd(self, group: str, name: str) -> str:
        return f"{self.prefix}/group/{group}/cmd/{name}"

    def infer(self, device: str) -> str:
        return f"{self.prefix}/{device}/infer"

    def status(self, device: str) -> str:
        return f"{self.prefix}/{device}/status"

    def desired(self, device: str) -> str:
        return f"{self.prefix}/{device}/desired"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/{device}/telemetry"

    def telemetry_ack(self, device: str) -> str:
        """Where the ingestion confirms what it has stored (a ``TelemetryAck``)."""
        return f"{self.prefix}/{device}/telemetry/ack"

    # Wildcards for the cloud side.
    def all_status(self) -> str:
        return f"{self.prefix}/+/status"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/+/telemetry"

    def shared_telemetry(self, share: str = "edgebento-sync") -> str:
        """An MQTT 5 shared subscription: each subscriber in the share gets part of the fleet."""
        return f"$share/{share}/{self.all_telemetry()}"

    def device_of(self, topic: str) -> str | None:
        """The device id in ``{prefix}/{device}/...``, or None for other topics."""
        head, _, rest = topic.partition(f"{self.prefix}/")
        if head or not rest:
            return None
        device = rest.split("/", 1)[0]
        return None if device == "group" else device


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: int


class Request(BaseModel):
    """A command or an inference request. Command arguments sit beside ``id`` (extra fields)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=128)
    reply_to: str | None = None
    expires_at: float | None = None  # unix seconds; past it the request is dropped and reported

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at < (now or time.time())


class Reply(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    id: str
    ok: bool
    error: str | None = None


class Applied(BaseModel):
    """What a device did with the desired state of one ``generation``: echoed in its status so
    a controller matches outcomes by these fields, never by clocks or message text."""

    model_config = ConfigDict(extra="forbid")
    generation: int = Field(ge=0)
    rollout: str | None = None
    model: ModelRef
    outcome: Literal["installed", "failed", "refused", "rolled_back"]
    reason: str | None = None


class Status(_Doc):
    """Retained on ``{prefix}/{device}/status``; the last will sets ``offline``."""

    model_config = ConfigDict(extra="allow")
    device: str
    state: Literal["online", "offline"]
    model: ModelRef | None = None
    boot_id: str | None = None
    applied: Applied | None = None  # the last desired generation the device acted on
    expired: bool = False  # the serving pack is past its expires_at (it keeps serving)
    ts: float = Field(default_factory=time.time)


class SignedInstruction(BaseModel):
    """An instruction signed like a manifest: ed25519 over the exact ``payload`` bytes.

    ``payload`` is the base64 of the JSON bytes of a ``RollbackInstruction``; the device decodes
    it, checks the signature against its trusted keys, then parses and checks the expiry.
    """

    model_config = ConfigDict(extra="forbid")
    payload: str = Field(max_length=8192)
    signature: str = Field(max_length=128)  # base64 of 64 bytes


class RollbackInstruction(_Doc):
    """The authority for one downgrade: ``device`` may go back to ``model`` until ``expires_at``."""

    device: str
    model: ModelRef
    rollout: str | None = None
    issued_at: float
    expires_at: float


class Desired(_Doc):
    """Retained on ``{prefix}/{device}/desired``: the model that should run on the device."""

    model_config = ConfigDict(extra="allow")
    model: ModelRef
    url: str | None = None  # where the pack lives; else resolved through the agent's store
    rollout: str | None = None
    generation: int = Field(default=0, ge=0)  # rises with each desired state a controller sets
    rollback: bool = False  # an aborted rollout sets the previous version back on purpose
    authorization: SignedInstruction | None = None  # required when ``rollback`` is true
    ts: float = Field(default_factory=time.time)


class TelemetryRecord(_Doc):
    """One record on ``{prefix}/{device}/telemetry``; ``seq`` rises by one per boot."""

    model_config = ConfigDict(extra="allow")
    device: str
    boot_id: str
    seq: int = Field(ge=0)
    ts: float
    kind: str  # heartbeat | inference | update | event | capture
    data: dict[str, Any] = Field(default_factory=dict)


class TelemetryAck(_Doc):
    """On ``{prefix}/{device}/telemetry/ack``: every record of ``boot_id`` up to ``seq`` (the
    highest contiguous seq) is stored; the device may delete them from its outbox."""

    boot_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=-1)


class TelemetryBatch(_Doc):
    """What a device publishes on its telemetry topic: one or more records, oldest first."""

    records: list[TelemetryRecord]
