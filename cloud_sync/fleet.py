"""Fleet status: one summary per device from retained status and desired state, the telemetry
heard while listening, and (with a store) the latest telemetry object each device left there.

How fresh a device is comes from evidence, newest first: a message heard live while listening
(timed on this host's clock: a device resending old records from its outbox is alive now), a
record's own ``ts`` (live or from the store), the retained status's ``ts``. The retained status
of an online device was written when it connected: its age says how long the session has lasted,
not that the device went quiet (the broker would have sent its last will), so such a device is
reported ``connected`` rather than "last seen 3m ago".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cloud_sync.evidence import RejectedMessage
from cloud_sync.fleet_metrics import DeviceSummary, FleetView
from cloud_sync.ingest import parse_batch
from cloud_sync.mqtt import CloudClient
from cloud_sync.parts import TELEMETRY_ROOT, parse_range, read_part, safe_id
from cloud_sync.protocol import Desired, Status, TelemetryRecord, Topics
from cloud_sync.store import ObjectStore
from modelpack.errors import StoreError, first_problem

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def latest_parts(
    store: ObjectStore, boots: dict[str, str | None], per_device: int = 10, day: str | None = None
) -> dict[str, list[str]]:
    """Per device, the keys of its newest telemetry objects of ``day`` (default today, UTC),
    oldest first: of the boot its status names when known (seqs restart at every boot)."""
    day = day or datetime.now(UTC).strftime("%Y-%m-%d")
    found: dict[str, list[tuple[int, str]]] = {}
    for key in store.list(f"{TELEMETRY_ROOT}/date={day}/"):
        span = parse_range(key)
        device = key.split("/")[2].removeprefix("device=")
        if not safe_id(device):
            continue
        boot = boots.get(device)
        if span is None or (boot and f"/part-{boot}-" not in key):
            continue
        found.setdefault(device, []).append((span[1], key))
    return {d: [k for _, k in sorted(parts)[-per_device:]] for d, parts in found.items()}


def fold_store(view: FleetView, store: ObjectStore, boots: dict[str, str | None]) -> int:
    """The records of each device's latest telemetry objects, folded into ``view``. Anyone who
    can write the bucket can put an object there: one that is not gzipped JSON lines (or past
    the caps of ``parts.read_part``), or a record that is not one the ingestion stores (``data``
    a list raised inside the fold), is skipped with a warning, and the others are read.
    Returns the objects skipped, so the status can say that it is incomplete."""
    skipped = 0
    for keys in latest_parts(store, boots).values():
        for key in keys:
            try:
                records = read_part(store, key)
            except StoreError as exc:
                log.warning("fleet status: skipped %s", exc)
                skipped += 1
                continue
            device = key.split("/")[2][7:]
            for record in records:
                try:
                    checked = TelemetryRecord.model_validate(record)
                except ValidationError as exc:
                    log.warning("fleet status: skipped a record of %s: %s", key,
                                first_problem(exc, "record"))  # fmt: skip
                    continue
                if checked.device == device:
                    view.on_record(record)
    return skipped


class FleetListener:
    """Retained status and desired state, and live telemetry, folded into a ``FleetView``.

    Identity comes from the topic: a status or record naming another device than its topic is
    dropped and counted (``dropped``). Every callback is guarded, so no message can stop it.
    """

    def __init__(self, broker_url: str, topics: Topics) -> None:
        self.topics = topics
        self.view = FleetView()
        self.boots: dict[str, str | None] = {}
        self.dropped: dict[str, int] = {}
        self.status_ts: dict[str, float] = {}  # the retained status's own ts, per device
        self.heard_at: dict[str, float] = {}  # this host's time of the last live message
        # What each device says of its certificate: shown, never trusted (identity_store's
        # record is the cloud's own).
        self.reported: dict[str, dict[str, Any]] = {}
        self.client = CloudClient(
            broker_url, on_message=self._on_message, on_connect=self._on_connect
        )
        self._started = False

    def _on_connect(self, _session_present: bool) -> None:
        self.client.subscribe(
            [
                (self.topics.all_status(), 1),
                (f"{self.topics.prefix}/+/desired", 1),
                (self.topics.all_telemetry(), 1),
            ]
        )

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            if self._fold(msg.topic, bytes(msg.payload)) and not msg.retain:
                self.heard_at[self.topics.device_of(msg.topic) or ""] = time.time()
        except RejectedMessage as exc:
            self._drop(exc.reason, msg.topic, str(exc))
        except Exception as exc:  # paho 2 would end its network thread, and the listening
            log.exception("fleet status: cannot process a message on %r", msg.topic)
            self._drop("internal", msg.topic, str(exc))

    def _drop(self, reason: str, topic: str, error: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        log.warning("fleet status ignored a message on %r (%s): %s", topic, reason, error)

    def _fold(self, topic: str, payload: bytes) -> bool:
        """Fold one message; True when it came from the device itself (status, telemetry)."""
        parsed = self.topics.parse(topic)
        if parsed is None or parsed.device is None or not payload:
            return False
        device = parsed.device
        if parsed.kind == "status":
            status = _parse(Status, topic, payload)
            if status.device != device:
                raise RejectedMessage(
                    "identity", f"{topic} carries the status of {status.device!r}"
                )
            self.boots[device] = status.boot_id
            self.status_ts[device] = status.ts
            if status.identity is not None:
                self.reported[device] = status.identity.model_dump(exclude_none=True)
            else:
                self.reported.pop(device, None)
            self.view.on_status(status, device)
            return True
        if parsed.kind == "desired":
            self.view.on_desired(device, _parse(Desired, topic, payload).model.version)
        elif parsed.kind == "telemetry":
            for record in parse_batch(self.topics, topic, payload):
                self.view.on_record(record)
            return True
        return False

    def summaries(self) -> dict[str, DeviceSummary]:
        """The view's summaries, with ``last_seen`` from the freshest evidence and ``heard``
        saying which it was: ``live``, ``record``, ``connected`` (an online device whose newest
        evidence is the status it published when it connected) or ``status``."""
        now = time.time()
        out = {}
        for device, summary in self.view.snapshot().items():
            seen = min(summary.last_seen or 0.0, now)  # a device clock ahead is not the future
            heard_at = self.heard_at.get(device)
            if heard_at is not None and heard_at >= seen:
                seen, heard = heard_at, "live"
            elif seen and seen > self.status_ts.get(device, 0.0):
                heard = "record"
            elif summary.state == "online":
                heard = "connected"
            else:
                heard = "status"
            extra = {**summary.extra, "heard": heard}
            if device in self.reported:
                extra["identity_reported"] = self.reported[device]
            out[device] = replace(summary, last_seen=seen or None, extra=extra)
        return out

    def start(self, settle_s: float = 0.5) -> FleetListener:
        """Connect, wait for the broker's SUBACK, then give it ``settle_s`` to send the
        retained documents (they follow the SUBACK). A second start is a no-op."""
        if self._started:
            return self
        self.client.start()
        self.client.wait_subscribed()
        self._started = True
        time.sleep(settle_s)
        return self

    def stop(self) -> None:
        self.client.stop()
        self._started = False

    def __enter__(self) -> FleetListener:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _parse(model: type[M], topic: str, payload: bytes) -> M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise RejectedMessage("schema", f"{topic}: {first_problem(exc, 'document')}") from exc


@dataclass(frozen=True)
class FleetReport:
    devices: dict[str, DeviceSummary]
    skipped_objects: int  # telemetry objects in the store that could not be read


def fleet_report(
    broker_url: str,
    topics: Topics | None = None,
    *,
    listen_s: float = 2.0,
    store: ObjectStore | None = None,
) -> FleetReport:
    with FleetListener(broker_url, topics or Topics()) as listener:
        skipped = 0
        if store is not None:
            skipped = fold_store(listener.view, store, dict(listener.boots))
        time.sleep(listen_s)
        return FleetReport(listener.summaries(), skipped)


def fleet_status(
    broker_url: str,
    topics: Topics | None = None,
    *,
    listen_s: float = 2.0,
    store: ObjectStore | None = None,
) -> dict[str, DeviceSummary]:
    return fleet_report(broker_url, topics, listen_s=listen_s, store=store).devices
