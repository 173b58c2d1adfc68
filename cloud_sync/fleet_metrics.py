"""What the fleet looks like, from retained status and telemetry: a summary per device and the
Prometheus metrics ``edgebento sync`` serves on ``/metrics``.

Inference records (``kind == "inference"``) are read defensively; the fields used are
``count`` (or ``requests``/``inferences``), ``errors``, ``p50_ms``, ``p99_ms`` and ``window_s``
in ``data``. Records of other kinds only refresh "last seen".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cloud_sync.protocol import Status
from modelpack.errors import EdgebentoError

if TYPE_CHECKING:
    from cloud_sync.store import ObjectStore

log = logging.getLogger(__name__)

MAX_FIGURE = 1e15  # counts and milliseconds past this are nonsense, not traffic


def sane_figure(value: Any) -> float | None:
    """``value`` if it is a finite, non-negative, sane number (a device may send anything: -1,
    a 400-digit integer, NaN), else None."""
    if type(value) is float:
        return value if 0 <= value <= MAX_FIGURE else None  # NaN fails both comparisons
    if type(value) is int:
        return float(value) if 0 <= value <= MAX_FIGURE else None  # no float() of 400 digits
    return None


def _number(data: dict[str, Any], *names: str) -> float | None:
    """The first of ``names`` in ``data`` that is a sane number."""
    for name in names:
        number = sane_figure(data.get(name))
        if number is not None:
            return number
    return None


def histogram_quantile_ms(data: dict[str, Any], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile q of a per-bucket latency histogram
    (the agent's ``latency_buckets_s`` and ``latency_counts``)."""
    bounds, counts = data.get("latency_buckets_s"), data.get("latency_counts")
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(bounds) != len(counts):
        return None
    sane = [sane_figure(c) or 0.0 for c in counts]
    total = sum(sane)
    if total <= 0:
        return None
    finite = [b for b in map(sane_figure, bounds) if b is not None]
    running = 0.0
    for bound, count in zip(bounds, sane, strict=True):
        running += count
        if running >= q * total:
            value = sane_figure(bound)
            if value is not None:
                return value * 1000.0
            # past the last finite bucket: report the last finite bound, a lower bound
            return finite[-1] * 1000.0 if finite else None
    return None


@dataclass(frozen=True)
class InferenceWindow:
    """One inference record's figures."""

    ts: float
    count: float
    errors: float
    p50_ms: float | None
    p99_ms: float | None
    window_s: float | None
    model_version: int | None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> InferenceWindow | None:
        if record.get("kind") != "inference":
            return None
        data = record.get("data") or {}
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        version = model.get("version") if isinstance(model, dict) else None
        errors = _number(data, "errors", "failed") or 0.0
        ok = _number(data, "ok")
        count = ok + errors if ok is not None else _number(data, "count", "requests") or 0.0
        return cls(
            ts=_number(record, "ts") or time.time(),
            count=count,
            errors=errors,
            p50_ms=_number(data, "p50_ms") or histogram_quantile_ms(data, 0.5),
            p99_ms=_number(data, "p99_ms") or histogram_quantile_ms(data, 0.99),
            window_s=_number(data, "window_s", "interval_s"),
            model_version=version if isinstance(version, int) else None,
        )


@dataclass(frozen=True)
class DeviceSummary:
    device: str
    state: str = "unknown"
    model: str | None = None
    version: int | None = None
    desired_version: int | None = None
    last_seen: float | None = None
    inference_rate: float | None = None
    p99_ms: float | None = None
    errors: float = 0.0
    inferences: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending_update(self) -> bool:
        return self.desired_version is not None and self.desired_version != self.version

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "model": self.model,
            "version": self.version,
            "desired_version": self.desired_version,
            "pending_update": self.pending_update,
            "last_seen": self.last_seen,
            "inference_rate": self.inference_rate,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "inferences": self.inferences,
            **self.extra,
        }


class FleetView:
    """Device summaries folded from status, desired state and telemetry records; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceSummary] = {}
        self._last_window: dict[str, float] = {}
        self.impersonations = 0  # statuses dropped because they named another device

    def _get(self, device: str) -> DeviceSummary:
        return self.devices.get(device) or DeviceSummary(device)

    def on_status(self, status: Status, device: str | None = None) -> bool:
        """Fold a status heard on ``device``'s topic; False (and nothing folded) when the
        payload names another device: identity comes from the topic, never from the payload."""
        if device is not None and status.device != device:
            self.impersonations += 1
            return False
        with self._lock:
            cur = self._get(status.device)
            extra: dict[str, Any] = (
                {"last_update": status.last_update.model_dump(mode="json")}
                if status.last_update is not None
                else {}
            )
            if status.expired:
                extra["expired"] = True
            if status.taken_over is not None:  # the device's word: shown, never decided on
                extra["taken_over"] = status.taken_over
            self.devices[status.device] = replace(
                cur,
                state=status.state,
                model=status.model.name if status.model else None,
                version=status.model.version if status.model else None,
                last_seen=max(cur.last_seen or 0.0, status.ts),
                extra={**cur.extra, **extra},
            )
        return True

    def on_desired(self, device: str, version: int) -> None:
        with self._lock:
            self.devices[device] = replace(self._get(device), desired_version=version)

    def on_record(self, record: dict[str, Any]) -> InferenceWindow | None:
        device = str(record.get("device"))
        window = InferenceWindow.from_record(record)
        with self._lock:
            cur = self._get(device)
            ts = _number(record, "ts") or 0.0
            cur = replace(cur, last_seen=max(cur.last_seen or 0.0, ts))
            if window is not None:
                # The agent sends counts since its previous record: the gap between two
                # records is the window when the record does not say.
                since = window.window_s or ts - self._last_window.get(device, ts)
                self._last_window[device] = ts
                rate = window.count / since if since > 0 else cur.inference_rate
                cur = replace(
                    cur,
                    inference_rate=rate,
                    p99_ms=window.p99_ms if window.p99_ms is not None else cur.p99_ms,
                    errors=cur.errors + window.errors,
                    inferences=cur.inferences + window.count,
                )
            self.devices[device] = cur
        return window

    def snapshot(self) -> dict[str, DeviceSummary]:
        with self._lock:
            return dict(sorted(self.devices.items()))


class FleetMetrics:
    """Prometheus metrics of the fleet and of the ingestion itself, on their own registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.online = Gauge("edgebento_fleet_devices_online", "devices online", registry=r)
        self.version = Gauge(
            "edgebento_fleet_model_version",
            "model version per device",
            ["device", "model"],
            registry=r,
        )
        self.inferences = Counter(
            "edgebento_fleet_inferences", "inferences reported", ["device"], registry=r
        )
        self.errors = Counter(
            "edgebento_fleet_inference_errors", "failed inferences reported", ["device"], registry=r
        )
        self.rate = Gauge(
            "edgebento_fleet_inference_rate", "inferences per second", ["device"], registry=r
        )
        # Separate gauges, not a "quantile" label: Prometheus keeps that label for summaries.
        self.p50 = Gauge(
            "edgebento_fleet_inference_p50_seconds",
            "median inference latency each device reported",
            ["device"],
            registry=r,
        )
        self.p99 = Gauge(
            "edgebento_fleet_inference_p99_seconds",
            "p99 inference latency each device reported",
            ["device"],
            registry=r,
        )
        self.records = Counter(
            "edgebento_sync_records", "telemetry records stored", ["root"], registry=r
        )
        self.duplicates = Counter(
            "edgebento_sync_duplicates", "records dropped as already stored", registry=r
        )
        self.rejected = Counter(
            "edgebento_sync_rejected_messages",
            "messages stored under rejected/",
            ["reason"],
            registry=r,
        )
        self.last_stored = Gauge(
            "edgebento_sync_last_stored_timestamp_seconds",
            "wall time of the last successful flush",
            registry=r,
        )
        self.acks = Counter(
            "edgebento_sync_acks", "acknowledgements published to devices", registry=r
        )
        self._by_device: dict[str, tuple[Any, ...]] = {}
        self.objects = Counter("edgebento_sync_objects", "objects written", registry=r)
        self.upload_seconds = Histogram(
            "edgebento_sync_flush_seconds", "time to write one flush", registry=r
        )
        self.upload_failures = Counter(
            "edgebento_sync_flush_failures", "flushes that failed and will be retried", registry=r
        )

    def on_status(self, view: FleetView, status: Status) -> None:
        """``status`` as heard on its own device's topic (the caller checked the identity)."""
        view.on_status(status)
        self.online.set(sum(1 for d in view.snapshot().values() if d.state == "online"))
        if status.model is not None:
            self.version.labels(status.device, status.model.name).set(status.model.version)

    def on_record(self, view: FleetView, record: dict[str, Any]) -> None:
        window = view.on_record(record)
        if window is None:
            return
        inferences, errors, rate, p50, p99 = self._children(str(record.get("device")))
        inferences.inc(window.count)
        errors.inc(window.errors)
        if window.window_s:
            rate.set(window.count / window.window_s)
        for gauge, value in ((p50, window.p50_ms), (p99, window.p99_ms)):
            if value is not None:
                gauge.set(value / 1000.0)

    def _children(self, device: str) -> tuple[Any, ...]:
        """Each device's labelled metrics, looked up once (``labels()`` costs on every record)."""
        found = self._by_device.get(device)
        if found is None:
            metrics = (self.inferences, self.errors, self.rate, self.p50, self.p99)
            found = self._by_device[device] = tuple(m.labels(device) for m in metrics)
        return found

    def watch_rollouts(self, store: ObjectStore) -> None:
        """Export how the rollouts in ``store`` ended (``RolloutOutcomes``)."""
        self.registry.register(RolloutOutcomes(store))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)


class RolloutOutcomes:
    """``edgebento_rollout_ended_timestamp_seconds{rollout, phase}``: when each rollout in the
    store ended, and how (``aborted``, ``completed``, ``timed_out``, ``unverified``), for the
    rollouts that ended in the last ``recent_s``; a collector that ``edgebento sync`` serves.

    The controller's ``edgebento_rollout_phase`` exists only while the controller runs: an
    abort over in less than a scrape interval, by a controller that exits right after, was never
    seen, and the alert on it never fired. The store keeps the outcome, and the sync process is
    always scraped, so the alert sees every abort for as long as its rule says. The headers are
    read without checking the controller's signature (sync holds no key of it): a writer to the
    bucket can raise a false alert or hide an abort from it, never move a device."""

    FINAL = ("aborted", "completed")  # a header in these phases never changes: read once

    def __init__(
        self, store: ObjectStore, recent_s: float = 7 * 86400, refresh_s: float = 10.0
    ) -> None:
        self.store, self.recent_s, self.refresh_s = store, recent_s, refresh_s
        self._ended: dict[str, tuple[str, float]] = {}  # rollout -> (phase, ended at)
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        from cloud_sync.rollout_store import load_header, rollout_ids

        for rollout in rollout_ids(self.store):
            known = self._ended.get(rollout)
            if known is not None and known[0] in self.FINAL:
                continue
            try:
                header = load_header(self.store, rollout)
            except EdgebentoError as exc:  # one bad document hides no other rollout
                log.warning("rollout outcomes skipped %s: %s", rollout, exc)
                continue
            if header.phase not in ("running", "aborting"):
                self._ended[rollout] = (header.phase, header.updated_at)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:  # scrapes may overlap; the store is read once per refresh_s
            if time.monotonic() - self._read_at >= self.refresh_s:
                self._read_at = time.monotonic()
                try:
                    self._refresh()
                except (EdgebentoError, OSError) as exc:  # the store is away: last outcomes
                    log.warning("rollout outcomes not refreshed: %s", exc)
            ended = dict(self._ended)
        family = GaugeMetricFamily(
            "edgebento_rollout_ended_timestamp_seconds",
            "when a rollout in the store ended (unix time), by its final phase",
            labels=["rollout", "phase"],
        )
        now = time.time()
        for rollout, (phase, at) in sorted(ended.items()):
            if now - at <= self.recent_s:
                family.add_metric([rollout, phase], at)
        yield family
