"""Telemetry: the outbox out to the cloud, acknowledged by the ingestion, in batches that fit.

Records leave the outbox only when the ingestion says they are stored: it publishes a
``TelemetryAck`` (a boot and the highest contiguous seq stored) on
``{prefix}/{device}/telemetry/ack``, and the publisher deletes up to it. A broker's PUBACK is not
enough: a broker without persistence loses what it acknowledged but had not delivered yet. What
stays unacknowledged for ``ack_timeout`` seconds is sent again, from the oldest record, at the
bounded drain rate and with at most ``window`` records unacknowledged at once, so a device that
was offline for a day does not flood the broker. The cloud deduplicates on (device, boot_id,
seq), so sending again never stores twice.

A clean stop waits for the last acknowledgements only while they come (``flush``): a device with
no ingestion, or one that is down, stops soon and keeps its records for the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from pydantic import ValidationError

from cloud_sync.protocol import TelemetryAck
from edge_agent.outbox import Outbox, Pending, batch_payload
from edge_agent.packet_limit import longest_fitting, packet_size
from edge_agent.session import Session
from edge_agent.telemetry_acks import NO_ACK_EVIDENCE_S, AckClock, stop_patience
from modelpack import untrusted_json
from modelpack.errors import BrokerError

log = logging.getLogger(__name__)


class TelemetryPublisher:
    """Drains the outbox to ``{prefix}/{device}/telemetry`` whenever the session is up."""

    def __init__(
        self,
        outbox: Outbox,
        session: Session,
        topic: str,
        batch_size: int,
        rate: Callable[[], float],
        ack_timeout: float = 10.0,
        window: int = 2000,
    ) -> None:
        self.outbox, self.session, self.topic = outbox, session, topic
        self.batch_size, self.ack_timeout, self.window = batch_size, ack_timeout, window
        self.rate = rate  # records per second, read each time (config can change it)
        self._acks: dict[str, int] = {}  # boot -> highest seq acknowledged, not yet applied
        self._acks_lock = threading.Lock()
        self._last_sent = 0  # outbox id of the newest record sent since the last rewind
        self._deadline: float | None = None  # past it, what is unacknowledged is sent again
        self._restart = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.clock = AckClock()
        self.published = self.acknowledged = self.resends = self.bad_acks = 0
        self.set_aside = 0  # records alone over the broker's packet limit
        # Records are kept aside while the limit is at most this, queued again once it is
        # higher (0: those an earlier run kept, at the first connection; None: none kept)
        self._aside_under: int | None = 0
        self._held_at: int | None = None  # a limit under the smallest record: nothing is sent

    def reconnected(self) -> None:
        """Send again everything not acknowledged: the broker may have lost it."""
        self._restart = True
        self._wake.set()

    def nudge(self) -> None:
        self._wake.set()

    def on_ack(self, payload: bytes) -> None:
        """A TelemetryAck arrived (on the network thread): applied on the publisher's thread."""
        try:
            ack = TelemetryAck.model_validate_json(payload)
        except ValidationError as exc:
            self.bad_acks += 1
            log.warning("ignored a telemetry ack: %s", exc.errors()[0]["msg"])
            return
        with self._acks_lock:
            if ack.seq > self._acks.get(ack.boot_id, -1):
                self._acks[ack.boot_id] = ack.seq
        self._wake.set()

    def _apply_acks(self) -> None:
        with self._acks_lock:
            acks, self._acks = self._acks, {}
        deleted = sum(self.outbox.ack_upto(boot, seq) for boot, seq in acks.items())
        if acks:
            self.clock.acked(acks, deleted, time.monotonic())
        if deleted:
            self.acknowledged += deleted
            self._deadline = time.monotonic() + self.ack_timeout  # progress: wait again
        if self.outbox.holes and any(self.outbox.holes.stops_at(*ack) for ack in acks.items()):
            self._rewind()  # a hole no batch named: now, under a floor past it (Holes)
        for boot in acks:
            if boot != self.outbox.boot_id and self.outbox.floor(boot) is None:
                self.outbox.holes.forget(boot)  # its holes past its last row never meet an ack

    def _rewind(self) -> None:
        self._last_sent = 0
        self._deadline = None
        self.clock.forget()

    def _send_some(self, limit: int) -> int:
        if self._held_at is not None and self._held_at == self.session.max_packet:
            return 0
        batch: list[Pending] = self.outbox.peek(self._last_sent, limit)
        if not batch:
            return 0
        floor = self.outbox.floor(batch[0].boot_id)
        payload = self._payload(batch, floor)
        if self.session.refusal(self.topic, payload) is not None:
            # Over the broker's packet limit (said, configured or learned): as many records as
            # fit, the rest in the next batch; one that alone is over it is set aside.
            def fits(n: int) -> bool:
                return self.session.refusal(self.topic, self._payload(batch[:n], floor)) is None

            count = longest_fitting(len(batch), fits)
            if count > 1 and self.session.limit.bound == self.session.max_packet:
                # A limit learned from the broker's drops is above its real one by an unknown
                # amount: half as many, or each batch cut a record shorter costs CLOSES drops.
                count //= 2
            if count == 0:
                return self._over_limit(batch[0], floor)
            batch = batch[:count]
            payload = self._payload(batch, floor)
        try:
            self.session.publish(self.topic, payload, qos=1)
        except BrokerError:  # a limit learned since it was checked: cut to fit next time
            return 0
        self._last_sent = batch[-1].id
        if floor is not None:
            self.outbox.holes.named(batch[0].boot_id, self._skip(batch, floor))
        self.clock.sent(batch[-1].boot_id, batch[-1].seq, time.monotonic())
        self.published += len(batch)
        if self._deadline is None:
            self._deadline = time.monotonic() + self.ack_timeout
        return len(batch)

    def _skip(self, batch: list[Pending], floor: int) -> list[int]:
        return self.outbox.holes.between(batch[0].boot_id, floor, batch[-1].seq)

    def _payload(self, batch: list[Pending], floor: int | None) -> bytes:
        """The batch, naming the holes between its floor and its last record (``skip``)."""
        return batch_payload(batch, floor, None if floor is None else self._skip(batch, floor))

    def _over_limit(self, record: Pending, floor: int | None) -> int:
        """A record alone over the limit: set aside (1), or 0 when even the smallest record
        would be over it. Then nothing can be sent, and setting records aside one by one would
        only empty the queue into the aside table (each writing an event, itself over): the
        queue is kept, and sending resumes once the limit changes (a CONNACK)."""
        limit = self.session.max_packet  # read once: a CONNACK may change it meanwhile
        least = Pending(record.id, _least_body(self.outbox.device, record), record.boot_id)
        if packet_size(self.topic, self._payload([least], floor)) > limit:
            self._held_at = limit
            log.warning(
                "telemetry held: the broker takes packets of at most %d bytes, under the "
                "smallest record's; the %d records queued are kept until a higher limit",
                limit,
                self.outbox.count,
            )
            return 0
        size = packet_size(self.topic, self._payload([record], floor))
        if size <= limit:
            return 0  # a CONNACK raised the limit since the check: sent at the next turn
        why = f"the message is {size} bytes; the broker takes at most {limit}"
        self._set_aside(record, why, kept=size <= self.session.limit.configured, size=size)
        return 1

    def _set_aside(self, record: Pending, why: str, kept: bool, size: int) -> None:
        """A record over the broker's packet limit on its own: out of the queue, counted, said
        in the log and in an event (the ingestion skips its seq, as an evicted record's). Over
        a limit the broker said (MQTT 5's CONNACK) or one learned from its drops, it is ``kept``
        aside (the newest ``ASIDE_KEPT``: a record leaves the device only when the ingestion
        stores it, and the limit may rise: another broker, one restarted, a false bound that
        lapses) and queued again (as a new record) once the limit is higher, or after a
        restart. Over ``max_packet_bytes``, which never rises in a run, it is deleted. It is
        filed under its own ``size`` (it fits any limit of at least that), not the limit read
        now: a CONNACK may have raised it since the check. No event is written about a record
        that is itself such an event (it would be over the limit too, and so on without end)."""
        kind, named = _described(record.body)
        self.outbox.holes.mark(record.boot_id, record.seq)  # earlier batches' floor is below it
        if kept:
            self.outbox.set_aside(record.id)
            under = self._aside_under
            self._aside_under = size - 1 if under is None else min(under, size - 1)
        else:
            self.outbox.ack([record.id])
        self.set_aside += 1
        note = ": kept, queued again once the broker's limit is higher" if kept else ""
        log.error(
            "telemetry record %d (%s) set aside, never sent%s: %s", record.seq, kind, note, why
        )
        if kind == "event" and named == "telemetry_set_aside":
            return  # counted and logged; an event about it would be set aside in turn
        event = {"event": "telemetry_set_aside", "boot_id": record.boot_id, "seq": record.seq,
                 "kind": kind, "bytes": len(record.body), "error": why,
                 "kept": kept}  # fmt: skip
        self.outbox.append("event", event)

    def _restore_aside(self) -> None:
        """Once connected (the CONNACK set the limit) under a limit higher than the one records
        were kept aside under: queue them again (those still over it are set aside again)."""
        if self._aside_under is None or self.session.max_packet <= self._aside_under:
            return
        self._aside_under = None
        if restored := self.outbox.restore_aside():
            log.info("%d telemetry record(s) set aside are queued again", restored)

    def _unacknowledged(self) -> int:
        """Records sent and not yet acknowledged; rewinds once they waited past the timeout."""
        in_flight = self.outbox.count_upto(self._last_sent) if self._last_sent else 0
        if in_flight == 0:
            self._deadline = None
        elif self._deadline is not None and time.monotonic() >= self._deadline:
            self.resends += 1
            log.info("%d telemetry records unacknowledged; sending them again", in_flight)
            self._rewind()
            return 0
        return in_flight

    def _run(self) -> None:
        budget, last = 0.0, time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                self._apply_acks()
                if not self.session.connected:
                    continue
                self._restore_aside()
                if self._restart:
                    self._restart = False
                    self._rewind()
                now = time.monotonic()
                rate = self.rate()
                budget = min(max(rate, 1.0), budget + (now - last) * rate)  # a second of tokens
                last = now
                in_flight = self._unacknowledged()
                while budget >= 1 and in_flight < self.window and not self._stop.is_set():
                    sent = self._send_some(min(self.batch_size, self.window - in_flight))
                    if not sent:
                        break
                    budget -= sent
                    in_flight += sent
            except Exception:  # a bug here must not end telemetry for the rest of the run
                log.exception("telemetry publisher")
                self._stop.wait(1.0)

    def start(self) -> TelemetryPublisher:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout: float) -> int:
        """A clean stop: wait while the ingestion acknowledges what is left, and return how many
        records stay unacknowledged (kept in the outbox for the next start).

        It ends when the outbox is empty, or once no acknowledgement has deleted a record for
        ``stop_patience`` (counted from the flush or from the last that did), or after
        ``timeout`` in all, or when the broker connection goes; the log says which.
        """
        started = time.monotonic()
        while True:
            left, now = self.outbox.count, time.monotonic()
            if left == 0:
                log.info("telemetry: every record acknowledged (%.2f s)", now - started)
                return 0
            why = self._why_stop_waiting(started, now, timeout)
            if why is not None:
                log.info(
                    "telemetry: stopped waiting for acknowledgements after %.2f s: %s; "
                    "%d records unacknowledged",
                    now - started,
                    why,
                    left,
                )
                return left
            self._wake.set()  # send what is left now, not at the next poll
            time.sleep(0.02)

    def _why_stop_waiting(self, started: float, now: float, timeout: float) -> str | None:
        if now - started >= timeout:
            return f"the stop's limit of {timeout:g} s"
        if not self.session.connected:
            return "the broker connection is gone"
        worst = self.clock.worst()
        patience = stop_patience(worst, timeout)
        since = max(started, self.clock.progress_at or started)
        if now - since < patience:
            return None
        first = self.clock.first_sent_at
        waited = now - (first if first is not None else started)
        if worst is None and not self.acknowledged and waited < NO_ACK_EVIDENCE_S:
            return None  # no ack yet, but too soon to tell an ingestion that is up from none
        if worst is not None:
            return f"none for {patience:.2f} s (the slowest recent round trip: {worst:.2f} s)"
        if self.acknowledged:  # acks of sends from before a rewind: deleted, never timed
            return f"none for {patience:.2f} s"
        return "none has come since the agent started (is an ingestion running?)"

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _described(body: bytes) -> tuple[str, object]:
    """The kind a stored record names, for the log and the event, and its data's ``event``;
    "?" when its row is not a JSON object (the outbox file is local state that may have been
    altered)."""
    try:
        record = untrusted_json.loads(body, "a telemetry record")
    except untrusted_json.NotJsonError:
        return "?", None
    if not isinstance(record, dict):
        return "?", None
    data = record.get("data")
    return str(record.get("kind", "?")), data.get("event") if isinstance(data, dict) else None


def _least_body(device: str, record: Pending) -> bytes:
    """The smallest record the agent writes (an event with no data) in ``record``'s place."""
    least = {"schema_version": 1, "device": device, "boot_id": record.boot_id,
             "seq": record.seq, "ts": time.time(), "kind": "event", "data": {}}  # fmt: skip
    return json.dumps(least, separators=(",", ":")).encode()
