"""Watching the fleet over MQTT: retained status and desired state, live telemetry, commands.

Used by rollouts (to set desired state and see each device report) and by ``fleet status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cloud_sync.fleet_metrics import FleetView
from cloud_sync.mqtt import CloudClient
from cloud_sync.protocol import Desired, Status, TelemetryBatch, Topics

log = logging.getLogger(__name__)


@dataclass
class VersionStats:
    """Inference figures a set of devices reported while running one model version."""

    count: float = 0.0
    errors: float = 0.0
    p99s: list[float] = field(default_factory=list)

    def add(self, other: VersionStats) -> None:
        self.count += other.count
        self.errors += other.errors
        self.p99s.extend(other.p99s)

    @property
    def p99_ms(self) -> float | None:
        if not self.p99s:
            return None
        ordered = sorted(self.p99s)
        return ordered[len(ordered) // 2]  # the median device-window p99: robust to one outlier


class FleetWatch:
    def __init__(self, broker_url: str, topics: Topics, devices: set[str] | None = None) -> None:
        self.topics = topics
        self.devices = devices
        self.statuses: dict[str, Status] = {}
        self.desired: dict[str, Desired] = {}
        self.view = FleetView()
        self.stats: dict[tuple[str, int | None], VersionStats] = defaultdict(VersionStats)
        self.changed = threading.Condition()
        self.client = CloudClient(
            broker_url, on_message=self._on_message, on_connect=self._on_connect
        )

    def _wanted(self, device: str | None) -> bool:
        return device is not None and (self.devices is None or device in self.devices)

    def _on_connect(self, _session_present: bool) -> None:
        for topic in (
            self.topics.all_status(),
            f"{self.topics.prefix}/+/desired",
            self.topics.all_telemetry(),
        ):
            self.client.client.subscribe(topic, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        device = self.topics.device_of(msg.topic)
        if not self._wanted(device) or not msg.payload:
            return
        assert device is not None
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            if kind == "status":
                self._on_status(Status.model_validate_json(msg.payload))
            elif kind == "desired":
                desired = Desired.model_validate_json(msg.payload)
                self.desired[device] = desired
                self.view.on_desired(device, desired.model.version)
            elif kind == "telemetry":
                self._on_telemetry(device, TelemetryBatch.model_validate_json(msg.payload))
        except ValidationError as exc:
            log.warning("ignored a %s message of %s: %s", kind, device, exc.errors()[0]["msg"])
            return
        with self.changed:
            self.changed.notify_all()

    def _on_status(self, status: Status) -> None:
        self.statuses[status.device] = status
        self.view.on_status(status)

    def _on_telemetry(self, device: str, batch: TelemetryBatch) -> None:
        status = self.statuses.get(device)
        version = status.model.version if status is not None and status.model else None
        for record in batch.records:
            window = self.view.on_record(record.model_dump(mode="json"))
            if window is None:
                continue
            stats = VersionStats(window.count, window.errors)
            if window.p99_ms is not None and window.count:
                stats.p99s.append(window.p99_ms)
            self.stats[(device, window.model_version or version)].add(stats)

    # --- acting ----------------------------------------------------------------------------------

    def start(self, settle_s: float = 0.5) -> FleetWatch:
        """Connect, and give the broker ``settle_s`` to send the retained documents."""
        self.client.start()
        time.sleep(settle_s)
        return self

    def stop(self) -> None:
        self.client.stop()

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def set_desired(self, device: str, desired: Desired | None) -> None:
        """Retained, so a device that is offline now reconciles when it connects."""
        payload = b"" if desired is None else desired.model_dump_json(exclude_none=True).encode()
        self.client.publish(self.topics.desired(device), payload, qos=1, retain=True)

    def version_stats(self, devices: list[str], version: int | None, same: bool) -> VersionStats:
        """Summed figures of ``devices`` on ``version`` (``same``) or on any other version."""
        total = VersionStats()
        for (device, v), stats in list(self.stats.items()):
            if device in devices and (v == version) == same:
                total.add(stats)
        return total

    def __enter__(self) -> FleetWatch:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
