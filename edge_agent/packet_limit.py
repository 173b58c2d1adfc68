"""The broker's packet limit when the broker does not say it: learned from how it drops us.

An MQTT 5 broker says its limit in CONNACK (Maximum Packet Size) and the session applies it
before publishing. An MQTT 3.1.1 broker cannot say it: Mosquitto with ``max_packet_size`` closes
the connection of a client that sends a larger packet, with no reason given. paho-mqtt keeps a
QoS 1 message until its PUBACK and sends it again at every reconnect, with the same mid (paho
2.2: ``reconnect()`` puts every unacknowledged message back to "publish" and ``_handle_connack``
sends them all right after ``on_connect``), so the broker drops every connection for it, for
ever: nothing else the device sends arrives, and the takeover watch would read the drops as
another client taking our client id.

The rule (``PacketLimitWatch``): when a connection the broker accepted is closed with no reason
given, the suspect is the largest message sent and not acknowledged within ``SOON_S`` before
the close, if it is larger than any packet the broker acknowledged (a broker that took a packet
takes any smaller one) and than ``MIN_SUSPECT``. Any message over the limit is larger than every
message under it, so when one was sent it is the suspect. The same message (the same mid: paho
sent it again) suspected at the next close too is over the limit: the limit is below its size,
and that bound is applied to every later publish, as the MQTT 5 limit is.

``PacketLimit`` is the session's side: it keeps the size and the owner of each message paho
holds, and once a verdict is in, removes from paho's queue, with paho's network loop stopped,
the message and any other over the bound, and tells each one's owner (a reply becomes a short
refusal). paho has no call that removes one message (``drop_out_messages`` drops them all, and
putting the others back would give them new mids): its own queue is used under its own lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from modelpack.errors import BrokerError

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

SOON_S = 5.0  # a close this long after a message's send can be that message's fault
MIN_SUSPECT = 1024  # bytes; no broker's limit is below (nor ``max_packet_bytes``'s floor)
PACKET_TOO_LARGE = 0x95  # MQTT 5 DISCONNECT reason code, for a broker that says it
_SENT = (mqtt.mqtt_ms_wait_for_puback, mqtt.mqtt_ms_wait_for_pubrec)

TooLarge = Callable[[str], None]  # told why, when its message is over the broker's limit


@dataclass(frozen=True)
class Unacked:
    """A message sent and not yet acknowledged when the connection closed."""

    mid: int
    topic: str
    size: int  # ``session.packet_size``: the PUBLISH packet, at most
    sent_at: float  # monotonic: its last send


@dataclass(frozen=True)
class Blame:
    """The message a close is blamed on; ``bound`` is set when it is the second close in a row
    for it: the largest packet the broker may take (below the message's size)."""

    message: Unacked
    bound: int | None = None


class PacketLimitWatch:
    """Tells, from unexplained closes, a message over the broker's packet limit."""

    def __init__(self, soon_s: float = SOON_S, floor: int = MIN_SUSPECT) -> None:
        self.soon_s, self.floor = soon_s, floor
        self.acked_max = 0  # the largest packet the broker acknowledged
        self.bound: int | None = None  # learned: the broker takes no packet larger
        self._suspect: int | None = None  # the mid the last close was blamed on

    def acked(self, size: int) -> None:
        self.acked_max = max(self.acked_max, size)

    def explained(self) -> None:
        """A connection ended for a known reason, or a connect failed: not in a row."""
        self._suspect = None

    def closed(self, now: float, unacked: Iterable[Unacked]) -> Blame | None:
        """A connection the broker accepted was closed with no reason: whom it is blamed on."""
        above = max(self.acked_max, self.floor)
        candidates = [u for u in unacked if u.size > above and now - u.sent_at <= self.soon_s]
        previous, self._suspect = self._suspect, None
        if not candidates:
            return None
        again = next((u for u in candidates if u.mid == previous), None)
        if again is None:
            largest = max(candidates, key=lambda u: u.size)
            self._suspect = largest.mid
            return Blame(largest)
        bound = again.size - 1
        self.bound = bound if self.bound is None else min(self.bound, bound)
        return Blame(again, self.bound)


class PacketLimit:
    """The session's side of the rule, over its paho client."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.watch = PacketLimitWatch()
        self.refused = 0  # messages removed from paho's queue: over the learned limit
        self._held: dict[int, tuple[int, TooLarge | None]] = {}  # mid -> size, owner
        self._verdict: Blame | None = None
        self._lock = threading.Lock()

    @property
    def bound(self) -> int | None:
        return self.watch.bound

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        properties: Any,
        size: int,
        on_too_large: TooLarge | None,
    ) -> mqtt.MQTTMessageInfo:
        # Under paho's lock: its network thread takes it before it handles a PUBACK, so the
        # message is ours before ``acked`` can be called for it; and a verdict is reached under
        # it, so a message is either refused here or in paho's queue when the verdict drops.
        with self.client._out_message_mutex:
            bound = self.watch.bound
            if bound is not None and size > bound:
                raise BrokerError(
                    f"not published: the message is {size} bytes; the broker takes at most {bound}"
                )
            info = self.client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
            if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._held[info.mid] = (size, on_too_large)
        return info

    def acked(self, mid: int) -> None:
        """paho's on_publish: a QoS 1 message's PUBACK (a QoS 0 one's send: not held)."""
        held = self._held.pop(mid, None)
        if held is not None:
            with self._lock:
                self.watch.acked(held[0])

    def explained(self) -> None:
        with self._lock:
            self.watch.explained()

    def closed(self, now: float) -> Blame | None:
        """On paho's thread, from its on_disconnect: read what it holds, change nothing."""
        with self.client._out_message_mutex:
            unacked = [
                Unacked(m.mid, m.topic, self._held.get(m.mid, (0, None))[0], m.timestamp)
                for m in self.client._out_messages.values()
                if m.state in _SENT
            ]
            with self._lock:
                blame = self.watch.closed(now, unacked)
                if blame is not None and blame.bound is not None:
                    self._verdict = blame
        return blame

    def drop_refused(self) -> None:
        """With paho's network loop stopped and before the next connect (its resend): remove
        what the broker refuses, and tell each message's owner."""
        with self._lock:
            verdict, self._verdict = self._verdict, None
        if verdict is None or verdict.bound is None:
            return
        bound, offender = verdict.bound, verdict.message
        with self.client._out_message_mutex:
            queue = self.client._out_messages
            over = [m for m in queue.values() if self._held.get(m.mid, (0, None))[0] > bound]
            for m in over:
                queue.pop(m.mid, None)
        self.refused += len(over)
        log.error(
            "the broker closed the connection twice right after this agent sent a message of "
            "%d bytes to %r, before acknowledging it: it is over the broker's packet limit "
            "(max_packet_size). Not sent again; from now on nothing over %d bytes is published "
            "(%d message(s) removed). Set max_packet_bytes to the broker's limit to say it at "
            "the start",
            offender.size,
            offender.topic[:200],
            bound,
            len(over),
        )
        for m in over:
            size, owner = self._held.pop(m.mid, (0, None))
            if owner is None:
                continue
            try:
                owner(f"the message is {size} bytes; the broker takes at most {bound}")
            except Exception:  # one owner's bug must not keep the others untold
                log.exception("telling the owner of a message to %s failed", m.topic[:200])


def longest_fitting(count: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n`` <= ``count`` with ``fits(n)``, for a ``fits`` true up to some n and
    false beyond (the first n records of a batch): ``count`` itself first, the usual case, then
    by halves. 0 when not even one fits."""
    if count == 0 or fits(count):
        return count
    low, high = 0, count  # fits(low) or low == 0; not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
