"""Telemetry: heartbeats and inference metrics into the outbox, and the outbox out to the broker.

Records are published as a TelemetryBatch at QoS 1 and deleted only once the broker sent its
PUBACK; after a reconnect everything unacknowledged is sent again, at a bounded rate so a
device that was offline for a day does not flood the broker. The cloud deduplicates on
(device, boot_id, seq), so at-least-once is enough.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_agent.outbox import Outbox, Pending, batch_payload
from edge_agent.session import Session

log = logging.getLogger(__name__)


class Heartbeat:
    """Uptime, CPU and RSS of this process (psutil, imported once, when first needed)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._process: Any = None

    def sample(self) -> dict[str, Any]:
        if self._process is None:
            import psutil

            self._process = psutil.Process(os.getpid())
            self._process.cpu_percent(None)  # the first call only primes the counter
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            cpu = self._process.cpu_percent(None)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "cpu_percent": cpu,
            "rss_bytes": rss,
            "threads": threading.active_count(),
        }


class TelemetryPublisher:
    """Drains the outbox to ``{prefix}/{device}/telemetry`` whenever the session is up."""

    def __init__(
        self,
        outbox: Outbox,
        session: Session,
        topic: str,
        batch_size: int,
        rate: Callable[[], float],
    ) -> None:
        self.outbox, self.session, self.topic = outbox, session, topic
        self.batch_size = batch_size
        self.rate = rate  # records per second, read each time (config can change it)
        self._pending: list[tuple[Any, list[int]]] = []
        self._last_sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0

    def reconnected(self) -> None:
        """Send again everything not acknowledged before the connection dropped."""
        self._restart = True
        self._wake.set()

    _restart = False

    def nudge(self) -> None:
        self._wake.set()

    def _collect_acks(self) -> None:
        still: list[tuple[Any, list[int]]] = []
        done: list[int] = []
        for info, ids in self._pending:
            if info.is_published():
                done.extend(ids)
            else:
                still.append((info, ids))
        self._pending = still
        self.outbox.ack(done)

    def _send_some(self) -> int:
        batch: list[Pending] = self.outbox.peek(self._last_sent, self.batch_size)
        if not batch:
            return 0
        info = self.session.publish(self.topic, batch_payload(batch), qos=1)
        self._pending.append((info, [r.id for r in batch]))
        self._last_sent = batch[-1].id
        self.published += len(batch)
        return len(batch)

    def _run(self) -> None:
        budget, last = 0.0, time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            self._collect_acks()
            if not self.session.connected:
                continue
            if self._restart:
                self._restart = False
                self._pending.clear()
                self._last_sent = 0
            now = time.monotonic()
            rate = self.rate()
            budget = min(max(rate, 1.0), budget + (now - last) * rate)  # one second of tokens
            last = now
            # Bounded window of unacknowledged batches, then the rate.
            while budget >= 1 and len(self._pending) < 20 and not self._stop.is_set():
                sent = self._send_some()
                if not sent:
                    break
                budget -= sent

    def start(self) -> TelemetryPublisher:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (used on a clean stop); True when it is."""
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
