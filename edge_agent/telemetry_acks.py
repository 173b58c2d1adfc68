"""When the ingestion acknowledges telemetry: each round trip, and how long a clean stop waits.

The publisher (``edge_agent.telemetry``) times each batch from its send to the acknowledgement
that covers it (``AckClock``); a clean stop waits for the last acknowledgements only as long as
the slowest recent round trip makes worth it (``stop_patience``), so a device with no ingestion
stops soon and keeps its records for the next start.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

# How long a clean stop waits for acknowledgements that make no progress (see ``stop_patience``).
NO_ACK_GRACE_S = 0.25
ACKED_FLOOR_S = 1.5
RTT_FACTOR = 3.0
# No acknowledgement says "no ingestion" only once records have waited this long for one since
# the agent first sent any: ``edgebento sync`` acknowledges once per flush of its buffer (every
# second by default), so an agent stopped right after its first send has heard nothing yet
# from an ingestion that is up.
NO_ACK_EVIDENCE_S = 3.0


def stop_patience(worst_rtt: float | None, flush_s: float) -> float:
    """How long a clean stop waits for an acknowledgement that deletes records, never more than
    ``flush_s``.

    With no acknowledgement in this agent's life (``worst_rtt`` None) and records sent at least
    ``NO_ACK_EVIDENCE_S`` ago (``flush`` waits until then, within ``flush_s``), there is no sign
    of an ingestion (none runs, or it is down): a short grace for the ack of what was just sent.
    Otherwise three times the slowest recent round trip: the ingestion acknowledges once per
    flush of its buffer, so one batch's round trip is anything from ~0 to its flush interval
    plus the write, and the slowest is what the last records may take; three of them absorb a
    slower flush on a busy host. Never under ``ACKED_FLOOR_S`` then (above ``edgebento sync``'s
    default flush of 1 s): an ingestion that answered before is there, and the floor costs a
    stop nothing unless that ingestion went away since.
    """
    if worst_rtt is None:
        return min(flush_s, NO_ACK_GRACE_S)
    return min(flush_s, max(ACKED_FLOOR_S, RTT_FACTOR * worst_rtt))


@dataclass(frozen=True)
class _Sent:
    boot_id: str
    seq: int  # the batch's last
    at: float


class AckClock:
    """When the ingestion acknowledges: each round trip (from sending the oldest batch an ack
    covers to the ack), the slowest of the last ``keep``, and the last ack that deleted records.
    ``sent``, ``forget`` and ``acked`` run on the publisher's thread; ``worst`` anywhere."""

    def __init__(self, keep: int = 16) -> None:
        self._sent: list[_Sent] = []  # in flight, bounded by the window
        self._rtts: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self.progress_at: float | None = None  # monotonic; an ack deleted records then
        self.first_sent_at: float | None = None  # monotonic; the first batch of this life

    def sent(self, boot_id: str, seq: int, at: float) -> None:
        self._sent.append(_Sent(boot_id, seq, at))
        if self.first_sent_at is None:
            self.first_sent_at = at

    def forget(self) -> None:
        """At a rewind: what is sent again is timed from its new send."""
        self._sent.clear()

    def acked(self, acks: dict[str, int], deleted: int, now: float) -> None:
        covered = [s.at for s in self._sent if s.seq <= acks.get(s.boot_id, -1)]
        if covered:
            self._sent = [s for s in self._sent if s.seq > acks.get(s.boot_id, -1)]
            with self._lock:
                self._rtts.append(now - min(covered))
        if deleted:
            self.progress_at = now

    def worst(self) -> float | None:
        with self._lock:
            return max(self._rtts, default=None)
