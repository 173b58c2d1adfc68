"""Telemetry ingestion: the fleet's MQTT telemetry into gzipped JSON Lines objects on the store.

At least once from the device, exactly once in the store:

* one MQTT 5 shared subscription (``$share/{share}/{prefix}/+/telemetry``) at QoS 1, so several
  sync processes split the fleet's messages between them;
* messages are acknowledged by hand (paho ``manual_ack``) only after every record they carry is
  in the store, so a killed sync process loses nothing: the broker sends again;
* records are grouped into contiguous ``(device, boot_id, seq)`` runs whose object keys are
  derived from the run (see ``cloud_sync.parts``); unless a run continues exactly where this
  process last wrote that stream, it first lists the stream's objects and drops the seqs already
  stored, so a redelivery (to this process or another one) adds no duplicate. A single sync
  process lists each stream once; processes sharing a subscription list on most flushes, since
  each sees gaps the others filled.

A persistent session (fixed client id, ``clean_start=False``) keeps unacknowledged messages at the
broker while the process restarts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cloud_sync.fleet_metrics import FleetMetrics, FleetView
from cloud_sync.mqtt import CloudClient
from cloud_sync.parts import (
    RangeSet,
    Run,
    Stream,
    encode_jsonl_gz,
    group_runs,
    parse_range,
    safe_id,
)
from cloud_sync.protocol import Status, TelemetryBatch, Topics
from cloud_sync.store import ObjectStore
from modelpack import sha256_bytes
from modelpack.errors import EdgebentoError, ProtocolError, first_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncOptions:
    share: str = "edgebento-sync"
    client_id: str | None = None  # fixed per process, so its session survives a restart
    flush_interval_s: float = 1.0
    max_buffered_records: int = 20_000
    upload_threads: int = 8
    session_expiry_s: int = 24 * 3600
    receive_maximum: int = 4000  # unacknowledged messages the broker may have in flight to us


@dataclass
class _Pending:
    mid: int
    qos: int
    generation: int
    records: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, Any] | None = None  # a message that broke the protocol, kept as evidence


def parse_batch(topics: Topics, topic: str, payload: bytes) -> list[dict[str, Any]]:
    """A telemetry message's records as plain dicts, or ProtocolError."""
    device = topics.device_of(topic)
    if device is None:
        raise ProtocolError(f"{topic} is not a device telemetry topic")
    try:
        batch = TelemetryBatch.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"telemetry on {topic}: {first_problem(exc, 'batch')}") from exc
    records = []
    for record in batch.records:
        if record.device != device:
            raise ProtocolError(f"{topic} carries a record of device {record.device!r}")
        if not safe_id(record.boot_id) or not safe_id(device):
            raise ProtocolError(f"{topic}: device or boot id is not a plain name")
        records.append(record.model_dump(mode="json"))
    return records


class StoredRanges:
    """Which seqs of each stream are in the store, learnt by listing once and by writing."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._known: dict[Stream, RangeSet] = {}
        self._lock = threading.Lock()

    def refresh_if_needed(self, runs: Iterable[Run]) -> None:
        for run in runs:
            with self._lock:
                known = self._known.get(run.stream)
            # Contiguous with what we wrote last: nobody else can have written it. Otherwise
            # (first sight, a replay, or a gap another process may have filled) ask the store.
            if known is None or run.first != known.high + 1:
                self._refresh(run.stream)

    def _refresh(self, stream: Stream) -> None:
        ranges = RangeSet()
        for key in self.store.list(stream.prefix):
            span = parse_range(key)
            if span is not None:
                ranges.add(*span)
        with self._lock:
            self._known[stream] = ranges

    def new_records(self, runs: Iterable[Run]) -> tuple[list[dict[str, Any]], int]:
        fresh, dropped = [], 0
        with self._lock:
            for run in runs:
                known = self._known.get(run.stream, RangeSet())
                for record in run.records:
                    if int(record["seq"]) in known:
                        dropped += 1
                    else:
                        fresh.append(record)
        return fresh, dropped

    def written(self, run: Run) -> None:
        with self._lock:
            self._known.setdefault(run.stream, RangeSet()).add(run.first, run.last)


class TelemetrySync:
    def __init__(
        self,
        store: ObjectStore,
        broker_url: str,
        *,
        topics: Topics | None = None,
        options: SyncOptions | None = None,
        metrics: FleetMetrics | None = None,
    ) -> None:
        self.store = store
        self.topics = topics or Topics()
        self.options = options or SyncOptions()
        self.metrics = metrics or FleetMetrics()
        self.view = FleetView()
        self.ranges = StoredRanges(store)
        self._lock = threading.Lock()
        self._buffer: list[_Pending] = []
        self._buffered_records = 0
        self._generation = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.options.upload_threads, thread_name_prefix="upload")
        self._thread: threading.Thread | None = None
        self.stored_records = 0
        self.objects_written = 0
        self.client = CloudClient(
            broker_url,
            client_id=self.options.client_id,
            manual_ack=True,
            clean_start=False,
            session_expiry_s=self.options.session_expiry_s,
            receive_maximum=self.options.receive_maximum,
            on_message=self._on_message,
            on_connect=self._on_connect,
        )

    # --- MQTT side (paho's thread) -------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        with self._lock:
            # Message ids of the previous connection mean nothing now; their records are still
            # uploaded, and the broker sends unacknowledged ones again.
            self._generation += 1
        # Subscribe on every connect, session or not: Mosquitto 2.0 does not bring shared
        # subscriptions back from its persistence file after a restart.
        self.client.client.subscribe(self.topics.shared_telemetry(self.options.share), qos=1)
        self.client.client.subscribe(self.topics.all_status(), qos=1)

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/status"):
            self._on_status(msg.payload)
            client.ack(msg.mid, msg.qos)
            return
        try:
            records = parse_batch(self.topics, msg.topic, msg.payload)
        except ProtocolError as exc:
            # Sending it again would never help: keep it under rejected/ for a person to look at,
            # and acknowledge it once it is stored there like any other message.
            log.warning("rejected a message: %s", exc)
            self.metrics.rejected.inc()
            evidence = {
                "topic": msg.topic,
                "error": str(exc),
                "received_at": time.time(),
                "payload": msg.payload.decode("utf-8", errors="replace"),
            }
            with self._lock:
                self._buffer.append(_Pending(msg.mid, msg.qos, self._generation, [], evidence))
            return
        for record in records:
            self.metrics.on_record(self.view, record)
        with self._lock:
            self._buffer.append(_Pending(msg.mid, msg.qos, self._generation, records))
            self._buffered_records += len(records)
            full = self._buffered_records >= self.options.max_buffered_records
        if full:
            self._wake.set()

    def _on_status(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            self.metrics.on_status(self.view, Status.model_validate_json(payload))
        except ValidationError:
            log.warning("ignored a status that does not follow the protocol")

    # --- store side (the flusher thread) -------------------------------------------------------

    def flush(self) -> int:
        """Write everything buffered; acknowledge it. Returns the records written."""
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._buffered_records = 0
            generation = self._generation
        if not pending:
            return 0
        started = time.perf_counter()
        try:
            written = self._write([r for p in pending for r in p.records])
            self._write_rejected([p.rejected for p in pending if p.rejected is not None])
        except EdgebentoError as exc:
            log.error("flush failed, will retry: %s", exc)
            self.metrics.upload_failures.inc()
            with self._lock:
                self._buffer[:0] = pending
                self._buffered_records += sum(len(p.records) for p in pending)
            return 0
        self.metrics.upload_seconds.observe(time.perf_counter() - started)
        for p in pending:
            if p.qos and p.generation == generation and self.client.connected.is_set():
                self.client.client.ack(p.mid, p.qos)
        return written

    def _write(self, records: list[dict[str, Any]]) -> int:
        runs = group_runs(records)
        self.ranges.refresh_if_needed(runs)
        fresh, dropped = self.ranges.new_records(runs)
        self.metrics.duplicates.inc(dropped)
        runs = group_runs(fresh)
        list(self._pool.map(self._put_run, runs))  # re-raises the first failure
        count = sum(len(run.records) for run in runs)
        self.stored_records += count
        self.objects_written += len(runs)
        return count

    def _write_rejected(self, documents: list[dict[str, Any]]) -> None:
        for doc in documents:
            body = json.dumps(doc, sort_keys=True).encode()
            day = time.strftime("%Y-%m-%d", time.gmtime(doc["received_at"]))
            self.store.put_bytes(f"rejected/date={day}/{sha256_bytes(body)[:32]}.json", body)

    def _put_run(self, run: Run) -> None:
        self.store.put_bytes(run.key, encode_jsonl_gz(run.records))
        self.ranges.written(run)
        self.metrics.records.labels(run.stream.root).inc(len(run.records))
        self.metrics.objects.inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.options.flush_interval_s)
            self._wake.clear()
            self.flush()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TelemetrySync:
        self.client.start()
        self._thread = threading.Thread(target=self._run, name="sync-flush", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Flush what is buffered, acknowledge it, and disconnect."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        self.client.stop()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TelemetrySync:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
