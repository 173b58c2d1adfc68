"""Telemetry ingestion: the fleet's MQTT telemetry into gzipped JSON Lines objects on the store.

At least once from the device, exactly once in the store, and acknowledged end to end:

* one MQTT 5 shared subscription (``$share/{share}/{prefix}/+/telemetry``) at QoS 1, so several
  sync processes split the fleet's messages between them;
* messages are acknowledged to the broker by hand (paho ``manual_ack``) only after every record
  they carry is in the store, and then to the device: a ``TelemetryAck`` on
  ``{prefix}/{device}/telemetry/ack`` names the highest contiguous seq of the boot that is
  stored (``cloud_sync.acks``). The device deletes only what that covers and sends again what
  stays unacknowledged, so a broker that loses messages (no persistence, kill -9) or a sync
  process that dies loses nothing;
* records are grouped into contiguous ``(device, boot_id, seq)`` runs whose object keys are
  derived from the run (see ``cloud_sync.parts``); unless a run continues exactly where this
  process last wrote that stream, it first lists the stream's objects and drops the seqs already
  stored, so a redelivery (to this process or another one) adds no duplicate.

No message can stop it: every callback is guarded, a message that cannot be processed (bad
JSON or schema, a record naming another device than its topic, too large) is kept under
``rejected/`` (``cloud_sync.evidence``), acknowledged, logged and counted, and a flush that
fails keeps its buffer and is tried again. A record whose timestamp is outside the window (a
clock before NTP) costs only itself: the rest of its batch is stored, and it is kept whole under
``rejected/`` within a budget per device, or left unacknowledged for the device to send again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cloud_sync.acks import AckTracker, Boot, StoredRanges
from cloud_sync.evidence import Evidence, EvidenceBudget, RejectedMessage
from cloud_sync.fleet_metrics import FleetMetrics, FleetView
from cloud_sync.mqtt import CloudClient
from cloud_sync.parts import Run, encode_parts, group_runs, safe_id
from cloud_sync.protocol import Status, TelemetryAck, TelemetryBatch, Topics
from cloud_sync.store import ObjectStore
from modelpack.errors import EdgebentoError, first_problem

log = logging.getLogger(__name__)

MAX_AGE_S = 400 * 86400.0  # an outbox may hold a long offline stretch, not decades
MAX_SKEW_S = 86400.0  # a device clock a day ahead is wrong, not early


@dataclass(frozen=True)
class SyncOptions:
    share: str = "edgebento-sync"
    client_id: str | None = None  # fixed per process, so its session survives a restart
    flush_interval_s: float = 1.0
    max_buffered_records: int = 20_000
    upload_threads: int = 8
    session_expiry_s: int = 24 * 3600
    receive_maximum: int = 4000  # unacknowledged messages the broker may have in flight to us
    max_message_bytes: int = 4 << 20
    evidence_bytes_per_device_hour: int = 8 << 20


@dataclass
class _Pending:
    mid: int
    qos: int
    generation: int
    records: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Evidence] = field(default_factory=list)  # kept under rejected/
    boots: dict[Boot, int] = field(default_factory=dict)  # each boot's floor in this message
    skips: dict[Boot, list[int]] = field(default_factory=dict)  # seqs that will never come
    ackable: tuple[tuple[str, str, int], ...] = ()  # seqs kept as evidence: acknowledged too


@dataclass(frozen=True)
class ParsedBatch:
    records: list[dict[str, Any]]
    boots: dict[Boot, int]  # (device, boot) -> the floor the device named (0 if none)
    # Records whose timestamp is outside the window (a clock before NTP, or far ahead): the
    # others of the batch are stored as usual; these are kept whole under rejected/.
    out_of_window: list[dict[str, Any]] = field(default_factory=list)
    skips: dict[Boot, list[int]] = field(default_factory=dict)  # the batch's skip, by boot


def _in_window(ts: float, now: float) -> bool:
    return now - MAX_AGE_S <= ts <= now + MAX_SKEW_S


def parse_batch(
    topics: Topics, topic: str, payload: bytes, now: float | None = None
) -> list[dict[str, Any]]:
    """A telemetry message's records as plain dicts, or RejectedMessage (a ProtocolError)."""
    return parse_telemetry(topics, topic, payload, now).records


def parse_telemetry(
    topics: Topics, topic: str, payload: bytes, now: float | None = None
) -> ParsedBatch:
    parsed = topics.parse(topic)
    if parsed is None or parsed.kind != "telemetry" or parsed.device is None:
        raise RejectedMessage("topic", f"{topic} is not a device telemetry topic")
    device = parsed.device
    try:
        batch = TelemetryBatch.model_validate_json(payload)
    except ValidationError as exc:
        raise RejectedMessage(
            "schema", f"telemetry on {topic}: {first_problem(exc, 'batch')}"
        ) from exc
    for record in batch.records:
        if record.device != device:
            raise RejectedMessage(
                "identity", f"{topic} carries a record of device {record.device!r}"
            )
        if not safe_id(record.boot_id) or not safe_id(device):
            raise RejectedMessage("schema", f"{topic}: device or boot id is not a plain name")
    now = time.time() if now is None else now
    boots = {(device, r.boot_id): batch.floor or 0 for r in batch.records}
    good = [r.model_dump(mode="json") for r in batch.records if _in_window(r.ts, now)]
    late = [r.model_dump(mode="json") for r in batch.records if not _in_window(r.ts, now)]
    skips = {boot: list(batch.skip) for boot in boots} if batch.skip else {}
    return ParsedBatch(good, boots, late, skips)


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
        self.budget = EvidenceBudget(self.options.evidence_bytes_per_device_hour)
        self.tracker = AckTracker()
        self.ranges = StoredRanges(store, self.tracker)
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
        # subscriptions back from its persistence file after a restart. What the fleet sent
        # while nobody was subscribed is sent again by the devices (no acknowledgement came).
        self.client.subscribe(
            [(self.topics.shared_telemetry(self.options.share), 1), (self.topics.all_status(), 1)]
        )

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        """Guarded: paho 2 ends its network thread on an exception, and ingestion with it."""
        try:
            self._receive(client, msg)
        except RejectedMessage as exc:
            self._reject(msg, exc)
        except Exception as exc:
            log.exception("cannot process a message on %r", msg.topic)
            self._reject(msg, RejectedMessage("internal", f"internal error: {exc}"))

    def _receive(self, client: Any, msg: Any) -> None:
        payload = bytes(msg.payload)
        if len(payload) > self.options.max_message_bytes:
            raise RejectedMessage(
                "too_large", f"{len(payload)} bytes; the cap is {self.options.max_message_bytes}"
            )
        parsed = self.topics.parse(msg.topic)
        if parsed is not None and parsed.kind == "status":
            assert parsed.device is not None
            self._on_status(parsed.device, msg.topic, payload)
            client.ack(msg.mid, msg.qos)
            return
        batch = parse_telemetry(self.topics, msg.topic, payload)
        self._observe(batch.records)
        pending = _Pending(
            msg.mid, msg.qos, self._generation, batch.records, boots=batch.boots, skips=batch.skips
        )
        if batch.out_of_window:
            self._keep_out_of_window(msg.topic, batch.out_of_window, pending)
        with self._lock:
            pending.generation = self._generation
            self._buffer.append(pending)
            self._buffered_records += len(batch.records)
            full = self._buffered_records >= self.options.max_buffered_records
        if full:
            self._wake.set()

    def _observe(self, records: list[dict[str, Any]]) -> None:
        """Fold records into the fleet view; a figure it cannot use never stops their storage."""
        for record in records:
            try:
                self.metrics.on_record(self.view, record)
            except Exception:
                log.exception("fleet metrics ignored record %s", record.get("seq"))

    def _keep_out_of_window(
        self, topic: str, records: list[dict[str, Any]], pending: _Pending
    ) -> None:
        """Records with an impossible timestamp are kept whole under rejected/ and acknowledged,
        within a byte budget per device and hour; past it they stay unacknowledged, so the
        device keeps them and sends them again later. Either way nothing is lost, and the rest
        of their batch is stored as usual."""
        first = records[0]
        error = (
            f"telemetry on {topic}: {len(records)} record(s) with a ts outside "
            f"[now - {MAX_AGE_S / 86400:.0f} days, now + {MAX_SKEW_S / 3600:.0f} h], "
            f"first seq {first['seq']} with ts {first['ts']!r}"
        )
        body = json.dumps(records, default=str).encode()
        self.metrics.rejected.labels("timestamp").inc()
        if not self.budget.take(str(first["device"]), len(body)):
            log.warning("%s; over the device's evidence budget: left unacknowledged", error)
            return
        log.warning("%s; kept under rejected/", error)
        pending.rejected.append(Evidence(topic, "timestamp", error, time.time(), body, whole=True))
        pending.ackable = tuple((r["device"], r["boot_id"], int(r["seq"])) for r in records)

    def _reject(self, msg: Any, exc: RejectedMessage) -> None:
        # Sending it again would never help: keep it under rejected/ for a person to look at,
        # and acknowledge it once it is stored there like any other message.
        log.warning("rejected a message on %r (%s): %s", msg.topic, exc.reason, exc)
        self.metrics.rejected.labels(exc.reason).inc()
        evidence = Evidence(msg.topic, exc.reason, str(exc), time.time(), bytes(msg.payload))
        with self._lock:
            self._buffer.append(
                _Pending(msg.mid, msg.qos, self._generation, [], [evidence], ackable=exc.ackable)
            )

    def _on_status(self, device: str, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        try:
            status = Status.model_validate_json(payload)
        except ValidationError as exc:
            raise RejectedMessage(
                "schema", f"status on {topic}: {first_problem(exc, 'status')}"
            ) from exc
        if status.device != device:
            raise RejectedMessage("identity", f"{topic} carries the status of {status.device!r}")
        self.metrics.on_status(self.view, status)

    # --- store side (the flusher thread) -------------------------------------------------------

    def flush(self) -> int:
        """Write everything buffered; acknowledge it. Returns the records written.

        A failure puts the whole buffer back to be tried again: nothing is dropped.
        """
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._buffered_records = 0
            generation = self._generation
        if not pending:
            return 0
        started = time.perf_counter()
        try:
            written = self._store(pending)
        except Exception as exc:
            log.error("flush failed, will retry: %s", exc)
            self.metrics.upload_failures.inc()
            with self._lock:
                self._buffer[:0] = pending
                self._buffered_records += sum(len(p.records) for p in pending)
            return 0
        self.metrics.upload_seconds.observe(time.perf_counter() - started)
        self.metrics.last_stored.set(time.time())
        self._acknowledge(pending, generation)
        return written

    def _store(self, pending: list[_Pending]) -> int:
        try:
            written = self._write([r for p in pending for r in p.records])
        except EdgebentoError:
            raise  # the store failed: try again later
        except Exception:
            # Some record breaks the writing itself: write message by message, and keep the
            # ones that fail as evidence, so they cannot hold back the rest.
            written = sum(self._write_or_reject(p) for p in pending)
        self._write_rejected([e for p in pending for e in p.rejected])
        return written

    def _write_or_reject(self, p: _Pending) -> int:
        try:
            return self._write(p.records)
        except EdgebentoError:
            raise
        except Exception as exc:
            log.exception("a message cannot be written; kept under rejected/")
            self.metrics.rejected.labels("internal").inc()
            doc = json.dumps(p.records, default=str).encode()
            p.rejected.append(
                Evidence("(buffered)", "internal", f"cannot write: {exc}", time.time(), doc)
            )
            p.records, p.boots, p.skips = [], {}, {}
            return 0

    def _acknowledge(self, pending: list[_Pending], generation: int) -> None:
        """To the devices (what is stored), then to the broker (the messages are done with)."""
        boots: dict[Boot, int] = {}
        for p in pending:
            for boot, floor in p.boots.items():
                boots[boot] = max(boots.get(boot, 0), floor)
            for boot, seqs in p.skips.items():  # never coming: acknowledged past
                for seq in seqs:
                    self.tracker.stored(boot, seq, seq)
            for device, boot_id, seq in p.ackable:
                self.tracker.stored((device, boot_id), seq, seq)
                boots.setdefault((device, boot_id), 0)
        for (device, boot_id), floor in boots.items():
            self.tracker.floor((device, boot_id), floor)
            seq = self.tracker.ack((device, boot_id))
            ack = TelemetryAck(boot_id=boot_id, seq=seq).model_dump_json().encode()
            self.client.client.publish(self.topics.telemetry_ack(device), ack, qos=1)
            self.metrics.acks.inc()
        for p in pending:
            if p.qos and p.generation == generation and self.client.connected.is_set():
                self.client.client.ack(p.mid, p.qos)

    def _write(self, records: list[dict[str, Any]]) -> int:
        runs = group_runs(records)
        self.ranges.refresh_if_needed(runs)
        fresh, dropped = self.ranges.new_records(runs)
        self.metrics.duplicates.inc(dropped)
        runs = group_runs(fresh)
        objects = sum(self._pool.map(self._put_run, runs))  # re-raises the first failure
        count = sum(len(run.records) for run in runs)
        self.stored_records += count
        self.objects_written += objects
        return count

    def _write_rejected(self, documents: list[Evidence]) -> None:
        for evidence in documents:
            self.store.put_bytes(evidence.key(), evidence.body())

    def _put_run(self, run: Run) -> int:
        """One object per part of ``run`` (``parts.PART_BYTES`` each); returns how many."""
        objects = 0
        for part, data in encode_parts(run):
            self.store.put_bytes(part.key, data)
            self.ranges.written(part)
            self.metrics.records.labels(part.stream.root).inc(len(part.records))
            self.metrics.objects.inc()
            objects += 1
        return objects

    def _run(self) -> None:
        """The flusher, supervised: an error in one round is logged and the next one runs."""
        while not self._stop.is_set():
            self._wake.wait(self.options.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("flusher round failed; the buffer is kept")
                self._stop.wait(min(5.0, self.options.flush_interval_s))

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, keep_trying: bool = False) -> TelemetrySync:
        """Connect and flush; return once the broker confirmed the subscriptions, or at once
        with ``keep_trying`` (connecting in the background; a refusal goes to ``client.fatal``)."""
        if self._thread is not None:
            return self
        self.client.start(keep_trying=keep_trying)
        if not keep_trying:
            self.client.wait_subscribed()
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
