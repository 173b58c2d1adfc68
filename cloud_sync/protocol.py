"""The device protocol: MQTT topic names and the JSON documents that travel on them.

Both sides import this module: ``edge_agent`` speaks it, ``cloud_sync`` drives it. Every
document carries ``schema_version``. Requests carry an ``id``; the reply goes to the MQTT 5
response topic (with the request's correlation data) or, for MQTT 3.1.1 clients, to the
request's ``reply_to`` field, so a plain ``mosquitto_pub``/``mosquitto_sub`` can drive a device.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_SKIP = 1000  # seqs a telemetry batch may name as never coming (TelemetryBatch.skip)
DEFAULT_PREFIX = "edgebento"
COMMANDS = ("ping", "deploy", "rollback", "config", "capture", "cancel", "shadow")


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
        parsed = self.parse(topic)
        return parsed.device if parsed is not None else None

    def parse(self, topic: str) -> DeviceTopic | None:
        """``topic`` as one of the device topics above, matched level by level, or None.

        Exact: ``{prefix}/{device}/cmd/{name}`` with nothing after the name, a device id that is
        one plain level (no wildcards, not ``group``), and the prefix's own levels first.
        """
        head = self.prefix.split("/")
        levels = topic.split("/")
        if levels[: len(head)] != head:
            return None
        rest = levels[len(head) :]
        if len(rest) < 2 or not _plain_level(rest[0]):
            return None
        if rest[0] == "group":
            group_cmd = len(rest) == 4 and rest[2] == "cmd"
            if group_cmd and _plain_level(rest[1]) and _plain_level(rest[3]):
                return DeviceTopic("group_cmd", None, rest[3], rest[1])
            return None
        device, kind = rest[0], tuple(rest[1:])
        if kind in (("infer",), ("status",), ("desired",), ("telemetry",)):
            return DeviceTopic(kind[0], device)  # type: ignore[arg-type]
        if kind == ("telemetry", "ack"):
            return DeviceTopic("telemetry_ack", device)
        if len(kind) == 2 and kind[0] == "cmd" and _plain_level(kind[1]):
            return DeviceTopic("cmd", device, kind[1])
        return None

    def tree(self, device: str) -> str:
        """The filter of everything a device owns: no other subscription may overlap it."""
        return f"{self.prefix}/{device}/#"


TopicKind = Literal["cmd", "group_cmd", "infer", "status", "desired", "telemetry", "telemetry_ack"]


@dataclass(frozen=True)
class DeviceTopic:
    kind: TopicKind
    device: str | None  # None for a group command
    name: str | None = None  # the command name
    group: str | None = None


def _plain_level(level: str) -> bool:
    # Three searches in C: parse runs for every message and reply topic.
    return 0 < len(level) <= 128 and "+" not in level and "#" not in level and "$" not in level


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters ``a`` and ``b`` (``+`` one level, ``#`` rest)."""
    left, right = a.split("/"), b.split("/")
    for x, y in zip(left, right, strict=False):
        if x == "#" or y == "#":
            return True
        if x != y and x != "+" and y != "+":
            return False
    if len(left) == len(right):
        return True
    longer = left if len(left) > len(right) else right
    return longer[min(len(left), len(right))] == "#"


MAX_TOPIC_BYTES = 65535  # MQTT's own limit: a two-byte length
# What Mosquitto refuses in a topic by dropping the connection of the client that sent it (each
# tried): control characters (C0, DEL, C1), lone surrogates (no UTF-8 spelling) and Unicode's
# non-characters. A device that publishes one is disconnected, so none may ever be published.
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)


def _text_problem(topic: object, max_bytes: int) -> str | None:
    if not isinstance(topic, str):
        return "it is not a string"
    if not topic:
        return "it is empty"
    if topic.isascii() and topic.isprintable():  # the usual topic, checked in C: no C0, no DEL
        return (
            f"it is {len(topic)} bytes; the limit is {max_bytes}"
            if len(topic) > max_bytes
            else None
        )
    bad = _FORBIDDEN.search(topic)
    if bad is not None:
        return f"it holds U+{ord(bad.group()):04X}, which brokers refuse"
    if len(topic) * 4 > max_bytes:  # only then can the UTF-8 length be over
        size = len(topic.encode())
        if size > max_bytes:
            return f"it is {size} bytes; the limit is {max_bytes}"
    return None


def topic_name_problem(topic: object, max_bytes: int = MAX_TOPIC_BYTES) -> str | None:
    """Why ``topic`` cannot be published to without the broker dropping the connection, or
    None: a non-empty string of valid UTF-8 without control characters or non-characters,
    without wildcards, within ``max_bytes`` of UTF-8 (brokers may set less than MQTT's 65535)."""
    problem = _text_problem(topic, max_bytes)
    if problem is None and ("+" in str(topic) or "#" in str(topic)):
        return "it holds a wildcard (+ or #)"
    return problem


def topic_filter_problem(topic: object, max_bytes: int = MAX_TOPIC_BYTES) -> str | None:
    """Why ``topic`` cannot be subscribed to, or None: the characters of a topic name, ``+``
    alone in its level and ``#`` alone in the last one."""
    problem = _text_problem(topic, max_bytes)
    if problem is not None:
        return problem
    levels = str(topic).split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return f"level {level!r}: + must stand alone in its level"
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"level {level!r}: # must stand alone in the last level"
    return None


# Every model is built on first use (``defer_build``): a device never parses most of them, and
# the schemas it does not use would otherwise cost it memory.


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    schema_version: int = SCHEMA_VERSION


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)
    name: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=0)


class SignedInstruction(BaseModel):
    """An instruction signed like a manifest: ed25519 over the exact ``payload`` bytes.

    ``payload`` is the base64 of the JSON bytes of a ``RollbackInstruction``; the device decodes
    it, checks the signature against its trusted keys, then parses and checks the expiry.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)
    payload: str = Field(max_length=8192)
    signature: str = Field(max_length=128)  # base64 of 64 bytes


# Ranges of what a ``config`` command (and the agent's config file) may set: a value outside
# them could stop the device from working (a 1 µs heartbeat floods the outbox; a 0.001 ms
# latency budget refuses every future update).
TelemetryInterval = Annotated[float, Field(ge=0.02, le=86_400)]  # the operator's own file
RemoteTelemetryInterval = Annotated[float, Field(ge=1.0, le=86_400)]  # a ``config`` command
MaxBatch = Annotated[int, Field(ge=1, le=4096)]
MaxPayloadBytes = Annotated[int, Field(ge=1024, le=64 << 20)]
DrainRate = Annotated[float, Field(ge=1, le=20_000)]
LatencyBudgetMs = Annotated[float, Field(ge=10, le=60_000)]
CaptureRate = Annotated[float, Field(gt=0, le=1)]
CaptureMaxBytes = Annotated[int, Field(ge=1024, le=64 << 20)]


class Request(BaseModel):
    """The fields every request carries: a command or an inference request."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    schema_version: int = SCHEMA_VERSION
    id: str = Field(min_length=1, max_length=128)
    reply_to: str | None = Field(default=None, max_length=512)
    # unix seconds; past it the request is dropped and reported. NaN (which Python's and
    # pydantic's parsers take) compares false with every time: it would never expire.
    expires_at: float | None = Field(default=None, allow_inf_nan=False)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at < (now or time.time())


class InferRequest(Request):
    """Tensor JSON or Open Inference Protocol v2 beside the request fields; the serving core
    validates the body (``body()``), this model only the envelope."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(Request.model_fields))


class PingCommand(Request):
    pass


class DeployCommand(Request):
    url: str | None = Field(default=None, max_length=4096)
    name: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, gt=0)


class RollbackCommand(Request):
    """Back to the previous good pack, or to ``name`` v``version``; ``authorization`` (a signed
    ``RollbackInstruction``) is required for anything but the device's own previous pack."""

    name: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, gt=0)
    url: str | None = Field(default=None, max_length=4096)
    authorization: SignedInstruction | None = None


class ConfigCommand(Request):
    telemetry_interval: RemoteTelemetryInterval | None = None
    max_batch: MaxBatch | None = None
    max_payload_bytes: MaxPayloadBytes | None = None
    drain_rate: DrainRate | None = None
    latency_budget_ms: LatencyBudgetMs | None = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(Request.model_fields), exclude_none=True)


class CaptureCommand(Request):
    action: Literal["start", "stop", "status"]
    rate: CaptureRate | None = None
    max_bytes: CaptureMaxBytes | None = None


class CancelCommand(Request):
    """Stop the download or install in progress (its reply says what was cancelled)."""


class ShadowCommand(Request):
    """Install ``name`` v``version`` beside the live pack (verified as any install) and run it
    on at most ``rate`` live inputs a second, off the hot path (``edge_agent.shadow``); or stop
    and remove it."""

    action: Literal["start", "stop"]
    name: str | None = Field(default=None, min_length=1, max_length=128)
    version: int | None = Field(default=None, gt=0)
    rate: float = Field(default=5.0, gt=0, le=1000)
    for_s: float = Field(default=600.0, gt=0, le=86_400)


COMMAND_MODELS: dict[str, type[Request]] = {
    "ping": PingCommand,
    "deploy": DeployCommand,
    "rollback": RollbackCommand,
    "config": ConfigCommand,
    "capture": CaptureCommand,
    "cancel": CancelCommand,
    "shadow": ShadowCommand,
}


class Reply(BaseModel):
    """A command's or an inference's answer; what each command adds sits beside these fields."""

    model_config = ConfigDict(extra="allow", defer_build=True)
    schema_version: int = SCHEMA_VERSION
    id: str
    ok: bool
    command: str | None = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    expired: bool | None = None
    duplicate: bool | None = None


class Applied(BaseModel):
    """What a device did with the desired state of one ``generation``: echoed in its status so
    a controller matches outcomes by these fields, never by clocks or message text."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    generation: int = Field(ge=0)
    rollout: str | None = None
    model: ModelRef
    outcome: Literal["installed", "failed", "refused", "rolled_back"]
    reason: str | None = None


class UpdateOutcome(BaseModel):
    """The last update a device attempted, as its status and telemetry report it."""

    model_config = ConfigDict(extra="ignore", defer_build=True)
    event: str = "update"
    outcome: Literal["installed", "failed", "refused", "rolled_back", "unchanged", "cancelled"]
    message: str = Field(default="", max_length=4096)
    trigger: str = Field(default="", max_length=64)
    model: ModelRef | None = None
    ts: float = 0.0
    source: str | None = Field(default=None, max_length=4096)


class CertificateReport(BaseModel):
    """What a device says of its own certificate (``Status.identity``, from the agent's
    ``{data_dir}/identity/status.json``). Shown beside the cloud's own record
    (``cloud_sync.identity_store``), never trusted: a device may lie, so no decision of the
    cloud reads it (docs/fleet-identity.md)."""

    model_config = ConfigDict(extra="ignore", defer_build=True)
    state: str = Field(max_length=32)  # valid, expired, renewal_refused
    serial: str | None = Field(default=None, max_length=64)  # hex
    issuer: str | None = Field(default=None, max_length=256)
    not_before: float | None = None
    not_after: float | None = None
    days_left: float | None = None
    renew_after: float | None = None  # when the device plans to renew
    rotation_due: bool = False  # past renew_after and not renewed yet
    last_rotation: float | None = None
    reason: str | None = Field(default=None, max_length=512)


class Status(_Doc):
    """Retained on ``{prefix}/{device}/status``; the last will sets ``offline``.

    The cloud takes the device from the topic; a status whose ``device`` names another device
    is dropped and counted. Unknown fields are ignored (a newer device), never read.
    """

    model_config = ConfigDict(extra="ignore", defer_build=True)
    device: str = Field(min_length=1, max_length=128)
    state: Literal["online", "offline"]
    model: ModelRef | None = None
    boot_id: str | None = Field(default=None, max_length=128)
    groups: list[str] = Field(default_factory=list, max_length=64)
    last_update: UpdateOutcome | None = None
    applied: Applied | None = None  # the last desired generation the device acted on
    expired: bool = False  # the serving pack is past its expires_at (it keeps serving)
    outbox: dict[str, int | str] | None = None
    shadow: dict[str, Any] | None = None  # cloud_sync.shadow_figures.ShadowFigures, read there
    identity: CertificateReport | None = None  # the device's own word: shown, never trusted
    # Connections this boot lost to another client with the device's MQTT client id (a cloned
    # image or config: ``edge_agent.reconnect``); None from a device that does not say (older).
    # A diagnostic figure shown per device (fleet status), never an input to a fleet decision:
    # a device may say anything of itself, and a clone may say it of another.
    taken_over: int | None = Field(default=None, ge=0, le=1 << 31)
    ts: float = Field(default_factory=time.time)

    @field_validator("identity", "taken_over", mode="wrap")
    @classmethod
    def _shown_only_never_costs_the_status(cls, value: Any, handler: Any) -> Any:
        """A malformed ``identity`` or ``taken_over`` is dropped, not the status: nothing the
        cloud reads of a status (state, model, applied) may depend on a part it never trusts."""
        try:
            return handler(value)
        except ValueError:
            return None


class RollbackInstruction(_Doc):
    """The authority for one downgrade (TUF/Uptane's rule): ``device`` may leave ``leaves`` for
    ``model`` once, at ``generation``, which must be above every instruction it applied, until
    ``expires_at``. ``nonce`` makes two instructions for the same step differ."""

    device: str
    model: ModelRef  # what it restores
    leaves: ModelRef | None = None  # what the device runs when signed (None: it runs nothing)
    rollout: str | None = None
    generation: int = Field(ge=1)
    nonce: str = Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")
    issued_at: float = Field(allow_inf_nan=False)
    expires_at: float = Field(allow_inf_nan=False)  # NaN or Infinity: it would never expire


class Desired(_Doc):
    """Retained on ``{prefix}/{device}/desired``: the model that should run on the device."""

    model_config = ConfigDict(extra="ignore", defer_build=True)
    model: ModelRef
    url: str | None = Field(
        default=None, max_length=4096
    )  # where the pack lives; else resolved through the agent's store
    rollout: str | None = None
    generation: int = Field(default=0, ge=0)  # rises with each desired state a controller sets
    rollback: bool = False  # an aborted rollout sets the previous version back on purpose
    authorization: SignedInstruction | None = None  # required when ``rollback`` is true
    ts: float = Field(default_factory=time.time)


class TelemetryRecord(_Doc):
    """One record on ``{prefix}/{device}/telemetry``; ``seq`` rises by one per boot."""

    model_config = ConfigDict(extra="ignore", defer_build=True)
    device: str = Field(min_length=1, max_length=128)
    boot_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0, lt=1 << 53)
    ts: float = Field(allow_inf_nan=False)
    kind: str = Field(pattern=r"^[a-z_]{1,32}$")  # heartbeat | inference | update | event | capture
    data: dict[str, Any] = Field(default_factory=dict)


class TelemetryAck(_Doc):
    """On ``{prefix}/{device}/telemetry/ack``: every record of ``boot_id`` up to ``seq`` (the
    highest contiguous seq) is stored; the device may delete them from its outbox."""

    boot_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=-1)


class TelemetryBatch(_Doc):
    """What a device publishes on its telemetry topic: one or more records, oldest first.

    ``floor``, when given, is the lowest seq of the records' boot the device still holds: every
    seq below it was acknowledged or evicted, so the ingestion's contiguous run starts there
    (a batch with a floor carries one boot only).

    ``skip`` (with a floor, at most ``MAX_SKIP``): seqs of that boot between the floor and the
    batch's last record that will never come (rows the device found corrupt and deleted,
    records set aside over the broker's packet limit), so the acknowledgement runs past them in
    one round trip. A sync from before ``skip`` refuses a batch that names it (``extra`` is
    forbidden): upgrade the sync before the agents (docs/upgrading.md).
    """

    records: list[TelemetryRecord] = Field(max_length=10_000)
    floor: int | None = Field(default=None, ge=0)
    skip: list[int] | None = Field(default=None, max_length=MAX_SKIP)

    @model_validator(mode="after")
    def _one_boot_under_a_floor(self) -> TelemetryBatch:
        if self.floor is not None and self.records:
            if len({r.boot_id for r in self.records}) > 1:
                raise ValueError("a batch with a floor carries records of one boot")
            if min(r.seq for r in self.records) < self.floor:
                raise ValueError("a record is below the batch's floor")
        if self.skip:
            if self.floor is None or not self.records:
                raise ValueError("skip needs a floor and records")
            top = max(r.seq for r in self.records)
            if any(not self.floor <= s <= top for s in self.skip):
                raise ValueError("a skipped seq is outside the batch's floor and last record")
            if set(self.skip) & {r.seq for r in self.records}:
                raise ValueError("a skipped seq is also a record of the batch")
        return self
