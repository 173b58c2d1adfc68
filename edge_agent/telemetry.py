"""Telemetry: heartbeats and inference metrics into the outbox, and the outbox out to the cloud.

Records leave the outbox only when the ingestion says they are stored: it publishes a
``TelemetryAck`` (a boot and the highest contiguous seq stored) on
``{prefix}/{device}/telemetry/ack``, and the publisher deletes up to it. A broker's PUBACK is not
enough: a broker without persistence loses what it acknowledged but had not delivered yet. What
stays unacknowledged for ``ack_timeout`` seconds is sent again, from the oldest record, at the
bounded drain rate and with at most ``window`` records unacknowledged at once, so a device that
was offline for a day does not flood the broker. The cloud deduplicates on (device, boot_id,
seq), so sending again never stores twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import TelemetryAck
from edge_agent.outbox import Outbox, Pending, batch_payload
from edge_agent.session import Session

log = logging.getLogger(__name__)


class Heartbeat:
    """Uptime, CPU and RSS of this process, from the kernel's own counters (``os.times`` and
    ``/proc/self/statm``): a device pays no library for them."""

    def __init__(self) -> None:
        self.started = time.time()
        self._cpu = _cpu_seconds()
        self._at = time.monotonic()

    def sample(self) -> dict[str, Any]:
        cpu, now = _cpu_seconds(), time.monotonic()
        # Like top: CPU time over wall time since the last sample; above 100 on several cores.
        percent = 100.0 * (cpu - self._cpu) / max(now - self._at, 1e-9)
        self._cpu, self._at = cpu, now
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "cpu_percent": round(percent, 1),
            "rss_bytes": _rss_bytes(),
            "threads": threading.active_count(),
        }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _rss_bytes() -> int:
    """Resident memory now (Linux); elsewhere the peak, which is what the OS reports."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


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
        self.published = self.acknowledged = self.resends = self.bad_acks = 0

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
        if deleted:
            self.acknowledged += deleted
            self._deadline = time.monotonic() + self.ack_timeout  # progress: wait again

    def _rewind(self) -> None:
        self._last_sent = 0
        self._deadline = None

    def _send_some(self, limit: int) -> int:
        batch: list[Pending] = self.outbox.peek(self._last_sent, limit)
        if not batch:
            return 0
        floor = self.outbox.floor(batch[0].boot_id)
        self.session.publish(self.topic, batch_payload(batch, floor), qos=1)
        self._last_sent = batch[-1].id
        self.published += len(batch)
        if self._deadline is None:
            self._deadline = time.monotonic() + self.ack_timeout
        return len(batch)

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

    def flush(self, timeout: float) -> bool:
        """Wait until the ingestion acknowledged everything (a clean stop); True when it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.count == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.outbox.count == 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
