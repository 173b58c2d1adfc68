"""Watching the fleet over MQTT: retained status and desired state, live telemetry, commands.

Used by rollouts (to set desired state and see each device report) and by ``fleet status``.

What the watch trusts: a device's identity is the topic it published on, never a field of the
payload. A status or telemetry record that names another device is dropped and counted
(``rejected["identity"]``), as is anything that does not parse (``rejected["schema"]``) or sits
on a topic outside ``{prefix}/{device}/{status|desired|telemetry}``. Every callback is guarded:
paho 2.2 re-raises a callback's exception in its network thread, which then dies, so one bad
message would otherwise blind the controller for the rest of the rollout.

The work per message is O(1): the status goes into a dict, the device into the set of devices
``take_changed`` hands the controller, and an inference record into that device's running totals
for one model version (with a bounded sample of its window p99s), never a scan of the fleet.

Whose figures count, and for what (a rollout judges devices, never sums one device can move):

- A record counts for the version the device's *status* says it runs; the record's own ``model``
  is a claim checked against it, and a record claiming another version is not counted
  (``rejected["version"]``): a device on v1 cannot vouch for v2.
- A record is counted once: ``(boot_id, seq)`` seen before (a resend from the outbox) is not.
- A device's total on a version is bounded by what it can physically have served since this
  watch saw it run that version, on this host's monotonic clock: ``max_rate`` inferences a second
  (``rate x window``). A device over it is a *suspect*, with the reason (``suspects``); its
  figures are dropped and it counts for nothing from then on.
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
P99_SAMPLES = 64  # window p99s kept per device and version: enough for a median, bounded
SEQS_KEPT = 4096  # per device: resends come from the oldest unacknowledged record, within this
MAX_RATE = 10_000.0  # inferences a second a device can serve, by default (Thresholds overrides)
SLACK_S = 30.0  # windows begun before the watch saw the version (a status comes after the swap)
BACKLOG_S = 3600.0  # the version a device ran when the watch started: windows from before it
_KINDS = ("status", "desired", "telemetry")


@dataclass
class VersionStats:
    """The inference figures one device reported while running one model version."""

    count: float = 0.0
    errors: float = 0.0
    p99s: deque[float] = field(default_factory=lambda: deque(maxlen=P99_SAMPLES))
    since: float = field(default_factory=time.monotonic)  # when the watch saw it run the version

    @property
    def error_rate_pct(self) -> float | None:
        return 100.0 * self.errors / self.count if self.count else None

    @property
    def p99_ms(self) -> float | None:
        """The median of its window p99s: one odd window does not move it."""
        if not self.p99s:
            return None
        ordered = sorted(self.p99s)
        return ordered[len(ordered) // 2]


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
        self.figures: dict[str, dict[int, VersionStats]] = {}  # device -> version -> figures
        self.suspects: dict[str, str] = {}  # device -> why its figures cannot be true
        self.max_rate = MAX_RATE
        self._seqs: dict[str, tuple[set[tuple[str, int]], deque[tuple[str, int]]]] = {}
        self.rejected: Counter[str] = Counter()
        self.messages = 0
        self.documents = 0  # status and desired messages: the retained burst after subscribing
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.client = CloudClient(
            broker_url, on_message=self._on_message, on_connect=self._on_connect
        )
        self._started = False

    def _on_connect(self, _session_present: bool) -> None:
        self.client.subscribe([(f"{self.topics.prefix}/+/{kind}", 1) for kind in _KINDS])

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
        if status.model is not None:
            if device not in self.first_model:
                self.first_model[device] = status.model
            versions = self.figures.setdefault(device, {})
            if status.model.version not in versions:
                # Running it from now on, as far as this watch can tell; what it ran when the
                # watch started may have windows from before that.
                since = time.monotonic() - (BACKLOG_S if len(versions) == 0 else 0.0)
                versions[status.model.version] = VersionStats(since=since)
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
        running = status.model if status is not None else None
        for record in batch.records:
            if record.device != device:
                self.rejected["identity"] += 1
                continue
            if not _figures_sane(record.data):
                # One device's negative or NaN count would void the error rate of the fleet; a
                # window with any impossible figure is not counted at all.
                self.rejected["figures"] += 1
                continue
            if not self._first_time(device, record.boot_id, record.seq):
                continue
            window = self.view.on_record(record.model_dump(mode="json"))
            if window is None or running is None or device in self.suspects:
                continue
            if not _plausible(window.count, window.errors, window.p99_ms):
                self.rejected["figures"] += 1
                continue
            claim = record.data.get("model")
            if window.model_version not in (None, running.version) or (
                isinstance(claim, dict) and claim.get("name") not in (None, running.name)
            ):
                self.rejected["version"] += 1  # a claim its status does not back
                continue
            self._count(device, running.version, window.count, window.errors, window.p99_ms)

    def _first_time(self, device: str, boot: str, seq: int) -> bool:
        """(boot, seq) not counted before for ``device``; the last ``SEQS_KEPT`` are kept."""
        seen, order = self._seqs.setdefault(device, (set(), deque()))
        if (boot, seq) in seen:
            return False
        seen.add((boot, seq))
        order.append((boot, seq))
        if len(order) > SEQS_KEPT:
            seen.discard(order.popleft())
        return True

    def _count(
        self, device: str, version: int, count: float, errors: float, p99_ms: float | None
    ) -> None:
        stats = self.figures.setdefault(device, {}).setdefault(version, VersionStats())
        elapsed = time.monotonic() - stats.since + SLACK_S
        if stats.count + count > self.max_rate * elapsed:
            del self.figures[device][version]
            self.suspects[device] = (
                f"reported {stats.count + count:.0f} inferences on v{version} in "
                f"{elapsed - SLACK_S:.0f}s (more than {self.max_rate:g}/s can serve)"
            )
            log.warning("%s is a suspect: %s", device, self.suspects[device])
            return
        stats.count += count
        stats.errors += errors
        if p99_ms is not None and count:
            stats.p99s.append(p99_ms)

    # --- acting ----------------------------------------------------------------------------------

    def start(self, settle_s: float = 0.5) -> FleetWatch:
        """Connect and wait for the broker's SUBACK: from then on nothing published is missed.
        Then give it ``settle_s`` to send the retained documents, which follow the SUBACK."""
        if self._started:  # ``with FleetWatch(...).start(settle_s=0)`` starts it twice: once
            return self  # (the second connect dropped the first, subscriptions and all)
        self.client.start()
        self.client.wait_subscribed()
        self._started = True
        if settle_s:
            time.sleep(settle_s)
        return self

    def stop(self) -> None:
        self.client.stop()
        self._started = False

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

    def device_stats(self, device: str, version: int) -> VersionStats | None:
        """What ``device`` reported while its status said it ran ``version`` (None: nothing)."""
        return self.figures.get(device, {}).get(version)

    def __enter__(self) -> FleetWatch:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
