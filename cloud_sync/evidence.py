"""Messages the ingestion cannot process, kept under ``rejected/`` for a person to look at.

Sending such a message again would never help, so it is stored as evidence (its topic, the
reason, the first ``MAX_EVIDENCE_BYTES`` of its payload and the payload's sha256) and then
acknowledged like any message that was stored. Records that are the device's own but carry an
impossible timestamp are kept whole (``whole``), within an ``EvidenceBudget`` per device.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from modelpack.errors import ProtocolError

MAX_EVIDENCE_BYTES = 64 << 10
REASONS = ("schema", "identity", "timestamp", "too_large", "topic", "internal")


class RejectedMessage(ProtocolError):
    """A message that breaks the protocol; ``reason`` is one of ``REASONS``.

    ``ackable`` lists ``(device, boot_id, seq)`` of records that are the topic's own device's
    and are kept as evidence: the device may delete them, it would only send them again.
    """

    def __init__(
        self, reason: str, message: str, ackable: tuple[tuple[str, str, int], ...] = ()
    ) -> None:
        super().__init__(message)
        self.reason = reason if reason in REASONS else "internal"
        self.ackable = ackable


@dataclass(frozen=True)
class Evidence:
    topic: str
    reason: str
    error: str
    received_at: float
    payload: bytes
    whole: bool = False  # records kept in full, not cut at MAX_EVIDENCE_BYTES

    def document(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "reason": self.reason,
            "error": self.error,
            "received_at": self.received_at,
            "payload_bytes": len(self.payload),
            "payload_sha256": hashlib.sha256(self.payload).hexdigest(),
            "payload": (self.payload if self.whole else self.payload[:MAX_EVIDENCE_BYTES]).decode(
                "utf-8", errors="replace"
            ),
        }

    def key(self) -> str:
        day = time.strftime("%Y-%m-%d", time.gmtime(self.received_at))
        body = json.dumps(self.document(), sort_keys=True).encode()
        return (
            f"rejected/date={day}/reason={self.reason}/{hashlib.sha256(body).hexdigest()[:32]}.json"
        )

    def body(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True).encode()


class EvidenceBudget:
    """Bytes of whole-record evidence each device may have stored per hour of this process.

    Bounds what one device (a broken clock, or a liar) can make the ingestion write; what is
    over the budget is not acknowledged, so the device keeps it and sends it again later."""

    def __init__(self, bytes_per_hour: int) -> None:
        self.bytes_per_hour = bytes_per_hour
        self._used: dict[str, tuple[int, int]] = {}  # device -> (hour, bytes used in it)
        self._lock = threading.Lock()

    def take(self, device: str, size: int) -> bool:
        hour = int(time.monotonic() // 3600)
        with self._lock:
            if len(self._used) > 100_000:  # forget old hours, bounded whatever the fleet
                self._used = {d: u for d, u in self._used.items() if u[0] == hour}
            seen, used = self._used.get(device, (hour, 0))
            used = used if seen == hour else 0
            if used + size > self.bytes_per_hour:
                return False
            self._used[device] = (hour, used + size)
            return True
