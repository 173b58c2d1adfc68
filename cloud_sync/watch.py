"""Watching the fleet over MQTT: retained status and desired state, live telemetry, commands.

Used by rollouts (to set desired state and see each device report) and by ``fleet status``.

What the watch trusts: a device's identity is the topic it published on, never a field of the
payload. A status or telemetry record that names another device is dropped and counted
(``rejected["identity"]``), as is anything that does not parse (``rejected["schema"]``) or sits
on a topic outside ``{prefix}/{device}/{status|desired|telemetry}``. Every callback is guarded:
paho 2.2 re-raises a callback's exception in its network thread, which then dies, so one bad
message would otherwise blind the controller for the rest of the rollout.

The work per message is O(1): the status goes into a dict, the device into the set of devices
``take_changed`` hands the controller, and an inference record into running totals per model
version (with a bounded sample of window p99s), never a scan of the fleet.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cloud_sync.fleet_metrics import FleetView, sane_figure
from cloud_sync.mqtt import CloudClient
from cloud_sync.protocol import Desired, ModelRef, Status, TelemetryBatch, Topics

log = logging.getLogger(__name__)
P99_SAMPLES = 2048  # window p99s kept per version: enough for a median, bounded in memory
_KINDS = ("status", "desired", "telemetry")


@dataclass
class VersionStats:
    """Inference figures a set of devices reported while running one model version."""

    count: float = 0.0
    errors: float = 0.0
    p99s: deque[float] = field(default_factory=lambda: deque(maxlen=P99_SAMPLES))

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


FIGURES = ("ok", "errors", "failed", "count", "requests", "p50_ms", "p99_ms", "window_s")


def _figures_sane(data: dict[str, object]) -> bool:
    """Every figure the record carries is a sane number (as the fleet view reads them)."""
    return all(sane_figure(data[name]) is not None for name in FIGURES if name in data)


def _plausible(count: float, errors: float, p99_ms: float | None) -> bool:
    """Counts a window can have: finite, not negative, no more errors than requests."""
    figures = (count, errors) if p99_ms is None else (count, errors, p99_ms)
    return all(math.isfinite(f) and f >= 0 for f in figures) and errors <= count


class FleetWatch:
    def __init__(self, broker_url: str, topics: Topics, devices: set[str] | None = None) -> None:
        self.topics = topics
        self.devices = devices
        self.statuses: dict[str, Status] = {}
        # The model each device reported first: what it ran before anything we published now,
        # even when its next status came before the controller looked.
        self.first_model: dict[str, ModelRef] = {}
        self.desired: dict[str, Desired] = {}
        self.view = FleetView()
        self.by_version: dict[int | None, VersionStats] = {}
        self.rejected: Counter[str] = Counter()
        self.messages = 0
        self.documents = 0  # status and desired messages: the retained burst after subscribing
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.client = CloudClient(
            broker_url, on_message=self._on_message, on_connect=self._on_connect
        )

    def _on_connect(self, _session_present: bool) -> None:
        for kind in _KINDS:
            self.client.client.subscribe(f"{self.topics.prefix}/+/{kind}", qos=1)

    def _device_and_kind(self, topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        prefix = self.topics.prefix.split("/")
        if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix:
            return None
        device, kind = parts[-2], parts[-1]
        if device == "group" or not device or kind not in _KINDS:
            return None
        return device, kind

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            self._handle(msg.topic, bytes(msg.payload))
        except Exception:  # a bad message must never kill paho's network thread
            self.rejected["error"] += 1
            log.exception("dropped a message on %s", getattr(msg, "topic", "?"))

    def _handle(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        found = self._device_and_kind(topic)
        if found is None:
            self.rejected["topic"] += 1
            return
        device, kind = found
        if self.devices is not None and device not in self.devices:
            return
        try:
            if kind != "telemetry":
                self.documents += 1
            if kind == "status":
                self._on_status(device, payload)
            elif kind == "desired":
                self._on_desired(device, payload)
            else:
                self._on_telemetry(device, TelemetryBatch.model_validate_json(payload))
        except ValidationError as exc:
            self.rejected["schema"] += 1
            log.warning("ignored a %s message of %s: %s", kind, device, exc.errors()[0]["msg"])

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status says nothing about the device
        status = Status.model_validate_json(payload)
        if status.device != device:
            self.rejected["identity"] += 1
            log.warning("dropped a status on %s's topic naming %r", device, status.device)
            return
        if status.model is not None and device not in self.first_model:
            self.first_model[device] = status.model
        with self.changed:
            self.statuses[device] = status
            self._changed.add(device)
            self.changed.notify_all()
        self.view.on_status(status)

    def _on_desired(self, device: str, payload: bytes) -> None:
        if not payload:
            self.desired.pop(device, None)
            return
        desired = Desired.model_validate_json(payload)
        self.desired[device] = desired
        self.view.on_desired(device, desired.model.version)

    def _on_telemetry(self, device: str, batch: TelemetryBatch) -> None:
        status = self.statuses.get(device)
        version = status.model.version if status is not None and status.model else None
        for record in batch.records:
            if record.device != device:
                self.rejected["identity"] += 1
                continue
            if not _figures_sane(record.data):
                # One device's negative or NaN count would void the error rate of the fleet; a
                # window with any impossible figure is not counted at all.
                self.rejected["figures"] += 1
                continue
            window = self.view.on_record(record.model_dump(mode="json"))
            if window is None:
                continue
            if not _plausible(window.count, window.errors, window.p99_ms):
                # One device's negative or NaN count would void the error rate of the fleet.
                self.rejected["figures"] += 1
                continue
            stats = self.by_version.setdefault(window.model_version or version, VersionStats())
            stats.count += window.count
            stats.errors += window.errors
            if window.p99_ms is not None and window.count:
                stats.p99s.append(window.p99_ms)

    # --- acting ----------------------------------------------------------------------------------

    def start(self, settle_s: float = 0.5) -> FleetWatch:
        """Connect, and give the broker ``settle_s`` to send the retained documents."""
        self.client.start()
        if settle_s:
            time.sleep(settle_s)
        return self

    def stop(self) -> None:
        self.client.stop()

    def wait(self, timeout: float) -> None:
        """Until a status changes, or ``timeout`` seconds."""
        with self.changed:
            if not self._changed:
                self.changed.wait(timeout)

    def take_changed(self) -> set[str]:
        """The devices whose status changed since the last call."""
        with self.changed:
            changed, self._changed = self._changed, set()
        return changed

    def set_desired(self, device: str, desired: Desired | None) -> None:
        """Retained, so a device that is offline now reconciles when it connects."""
        self.set_desired_many([(device, desired)])

    def set_desired_many(self, items: Sequence[tuple[str, Desired | None]]) -> None:
        """Publish every desired state, then wait for the broker's acknowledgements: one round
        trip for the lot instead of one per device."""
        from modelpack.errors import BrokerError

        pending = []
        for device, desired in items:
            payload = b"" if desired is None else desired.model_dump_json(exclude_none=True)
            data = payload.encode() if isinstance(payload, str) else payload
            info = self.client.client.publish(self.topics.desired(device), data, 1, True)
            pending.append((device, info))
        deadline = time.monotonic() + 30 + len(items) / 500
        for device, info in pending:
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise BrokerError(f"publishing the desired state of {device}: {exc}") from exc
            if not info.is_published():
                raise BrokerError(f"the broker did not acknowledge {device}'s desired state")

    def version_stats(self, version: int | None, same: bool) -> VersionStats:
        """Summed figures of the watched devices on ``version`` (``same``) or on any other."""
        total = VersionStats()
        for v, stats in list(self.by_version.items()):
            if (v == version) == same:
                total.add(stats)
        return total

    def __enter__(self) -> FleetWatch:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
