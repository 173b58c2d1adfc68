"""The agent's settings: a TOML file, overridden by ``EDGEBENTO_*`` variables, overridden by flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloud_sync.protocol import (
    CaptureMaxBytes,
    DrainRate,
    LatencyBudgetMs,
    MaxBatch,
    MaxPayloadBytes,
    TelemetryInterval,
    Topics,
    filters_overlap,
    topic_filter_problem,
    topic_name_problem,
)
from modelpack.errors import ConfigError, first_problem

ENV_PREFIX = "EDGEBENTO_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineConfig(_Section):
    """Perceive, decide, act: a sensor topic in, the model, a result (or action) topic out."""

    name: str
    input_topic: str
    output_topic: str
    input: str | None = None  # the model input a bare list of numbers feeds; default: the only one
    labels: list[str] = Field(default_factory=list)  # argmax -> label on the output, if given
    threshold: float | None = None  # publish only when the top score reaches it


class Limits(_Section):
    """What ``config`` commands may change at run time (the ranges are the protocol's)."""

    telemetry_interval: TelemetryInterval = 10.0
    max_batch: MaxBatch = 256
    max_payload_bytes: MaxPayloadBytes = 1 << 20
    drain_rate: DrainRate = 500.0  # telemetry records per second after a reconnect
    latency_budget_ms: LatencyBudgetMs = 250.0  # health check after an update


class HttpLimits(_Section):
    """The local HTTP endpoint's bounds: open connections, the threads that answer them, and
    a time limit per phase of a request (docs/edge-agent.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_connections: int = Field(default=32, ge=1, le=4096)
    workers: int = Field(default=4, ge=1, le=64)
    head_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    run_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    write_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    idle_timeout_s: float = Field(default=15.0, gt=0, le=3600)


class AgentConfig(_Section):
    device: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    broker: str = "mqtt://127.0.0.1:1883"
    data_dir: Path
    trust: list[Path] = Field(min_length=1)
    store: str | None = None
    pack: Path | None = None
    prefix: str = "edgebento"
    groups: list[str] = Field(default_factory=list)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # mTLS, as AWS IoT Core wants
    key_file: Path | None = None
    # Enrollment by claim (edge_agent/identity.py, docs/fleet-identity.md): a one-time token,
    # sent with a CSR over the claim listener with the shared claim certificate. The device's
    # own key and certificate then live in {data_dir}/identity/ and are renewed at
    # ``renew_at`` of their life.
    enroll_token: str | None = Field(default=None, max_length=256)
    enroll_token_file: Path | None = None
    claim_broker: str | None = None  # mqtts://HOST:PORT of the claim listener
    claim_cert_file: Path | None = None
    claim_key_file: Path | None = None
    renew_at: float = Field(default=2 / 3, gt=0.1, lt=0.95)
    keepalive: int = Field(default=30, ge=5)
    backoff_min: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    http: HttpLimits = Field(default_factory=HttpLimits)
    outbox_max_bytes: int = Field(default=16 << 20, ge=4096)
    outbox_overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    telemetry_batch: int = Field(default=50, gt=0, le=1000)
    # Seconds a sent record may stay unacknowledged by the ingestion before it is sent again,
    # and how many records may be unacknowledged at once.
    telemetry_ack_timeout: float = Field(default=10.0, ge=0.5, le=3600)
    telemetry_window: int = Field(default=2000, ge=1, le=100_000)
    # Drift summaries (docs/monitoring.md): one per model version and window; 0 turns them off.
    drift_window_s: float = Field(default=60.0, ge=0, le=3600)
    # Rows a window's bins count on a steady device: past it, a sample of the requests (every
    # one counted); 0 bins every row (docs/monitoring.md, "Sampling").
    drift_budget_rows: int = Field(default=4096, ge=0, le=1 << 40)
    intra_op_threads: int = Field(default=1, ge=0)
    inference_workers: int = Field(default=0, ge=0)  # 0: on the MQTT network thread
    golden_rtol: float = 1e-3
    golden_atol: float = 1e-4
    capture_rate: float = Field(default=0.0, ge=0, le=1)
    capture_max_bytes: CaptureMaxBytes = 4 << 20
    # Updates: where file:// deploys may point, the cap on any download, the overall deadline
    # of one, and whether an installed pack that has since expired stops serving at boot.
    file_roots: list[Path] = Field(default_factory=list)
    max_download_bytes: int = Field(default=1 << 30, ge=1 << 10, le=16 << 30)
    download_deadline_s: float = Field(default=900.0, ge=1, le=86_400)
    refuse_expired: bool = False
    keep_packs: int = Field(default=3, ge=2)
    # What the broker takes: topics of up to ``max_topic_bytes`` (AWS IoT Core: 256), packets of
    # up to ``max_packet_bytes`` (an MQTT 5 broker says its own in CONNACK; the smaller counts).
    # A packet or topic past them makes the broker drop the connection: none is ever sent.
    max_topic_bytes: int = Field(default=65535, ge=64, le=65535)
    max_packet_bytes: int | None = Field(default=None, ge=1024, le=268_435_455)
    limits: Limits = Field(default_factory=Limits)
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    log_level: str = "INFO"

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("broker must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        return value

    @model_validator(mode="after")
    def _topics_a_broker_takes(self) -> AgentConfig:
        """Every topic the agent subscribes or publishes to, checked at load: a broker drops a
        client that sends a malformed one, at every reconnect."""
        limit, topics = self.max_topic_bytes, Topics(self.prefix)
        for group in self.groups:
            problem = topic_name_problem(group, limit)
            if problem is None and ("/" in group or group.startswith("$") or group == "group"):
                problem = "it must be one plain topic level"
            if problem is not None:
                raise ValueError(f"group {group[:80]!r}: {problem}")
        # The longest of the device's topics, and each group's command topic (a name in place
        # of the + it is subscribed with).
        mine = [topics.telemetry_ack(self.device), *(topics.group_cmd(g, "x") for g in self.groups)]
        for topic in mine:
            problem = topic_name_problem(topic, limit)
            if problem is not None:
                raise ValueError(
                    f"prefix {self.prefix[:80]!r}: the topic {topic[:120]!r} is not valid: {problem}"
                )
        for p in self.pipelines:
            problem = topic_filter_problem(p.input_topic, limit)
            if problem is not None:
                raise ValueError(
                    f"pipeline {p.name!r}: input_topic {p.input_topic[:120]!r}: {problem}"
                )
            problem = topic_name_problem(p.output_topic, limit)
            if problem is None:  # its own results would come back to it as readings, for ever
                fed = next(
                    (q for q in self.pipelines if filters_overlap(p.output_topic, q.input_topic)),
                    None,
                )
                problem = None if fed is None else f"it is the input of pipeline {fed.name!r}"
            if problem is not None:
                raise ValueError(
                    f"pipeline {p.name!r}: output_topic {p.output_topic[:120]!r}: {problem}"
                )
        return self

    @model_validator(mode="after")
    def _pipelines_stay_out_of_the_device_tree(self) -> AgentConfig:
        """A pipeline on the device's own topics could run its commands; refused at load."""
        topics = Topics(self.prefix)
        owned = [topics.tree(self.device), *(topics.group_cmd(g, "#") for g in self.groups)]
        for p in self.pipelines:
            for topic in (p.input_topic, p.output_topic):
                hit = next((o for o in owned if filters_overlap(topic, o)), None)
                if hit is not None:
                    raise ValueError(
                        f"pipeline {p.name!r}: {topic!r} overlaps the device's own topics {hit!r}"
                    )
        return self

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts"


# Settings that may come from EDGEBENTO_* (lists are split on commas).
_LIST_FIELDS = {"trust", "groups", "file_roots"}


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in AgentConfig.model_fields:
        if name in ("limits", "pipelines", "http"):
            continue
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        found[name] = [p for p in raw.split(",") if p] if name in _LIST_FIELDS else raw
    if ENV_PREFIX + "TELEMETRY_INTERVAL" in environ:
        found["limits"] = {"telemetry_interval": environ[ENV_PREFIX + "TELEMETRY_INTERVAL"]}
    return found


def _read_file(path: Path) -> dict[str, Any]:
    import tomllib  # only with a config file (about 0.1 MB that a device started by flags never holds)

    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    # tomllib's other refusals, which are not TOMLDecodeError.
    except RecursionError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: nested too deep") from exc
    except ValueError as exc:  # an integer past Python's 4,300-digit limit
        raise ConfigError(f"config file {path} holds a number with too many digits") from exc
    # One [agent] table, or the settings at the top level.
    return dict(data.get("agent", data))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    file: Path | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> AgentConfig:
    """File, then environment, then flags (None means "not given"); one error for bad values."""
    settings: dict[str, Any] = _read_file(file) if file is not None else {}
    settings = _merge(settings, _from_env(dict(os.environ if environ is None else environ)))
    settings = _merge(settings, {k: v for k, v in (flags or {}).items() if v not in (None, [])})
    try:
        return AgentConfig.model_validate(settings)
    except ValidationError as exc:
        raise ConfigError(f"agent config: {first_problem(exc, 'config')}") from exc
