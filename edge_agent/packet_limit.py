"""The broker's packet limit when the broker does not say it: learned from how it drops us.

An MQTT 5 broker says its limit in CONNACK (Maximum Packet Size) and the session applies it
before publishing; one that does not, and closes a connection for a packet over it, says why
(DISCONNECT 0x95, Packet too large): that alone is a verdict. An MQTT 3.1.1 broker cannot say
either: Mosquitto with ``max_packet_size`` closes the connection of a client that sends a larger
packet, with no reason given, as soon as it reads that packet's header. paho-mqtt keeps a QoS 1
message until its PUBACK and sends it again at every reconnect, right after CONNACK (paho 2.2:
``reconnect()`` puts every unacknowledged message back to "publish" and ``_handle_connack``
stamps and sends them all right after ``on_connect``), so the broker drops every connection for
it, for ever: nothing else the device sends arrives.

A link that drops (a slow uplink, a broker restarted) looks the same at each close, so the
evidence is a pattern (``PacketLimitWatch``). The suspect of a close with no reason given is the
largest message sent (or sent again) within ``SOON_S`` before it and not acknowledged, larger
than ``MIN_SUSPECT`` and than any packet the broker acknowledged since the CONNACK (a broker that
took a packet takes any smaller one; an earlier connection may have been to a broker with a
higher limit). Any message over the limit is larger than every message under it, so when one
was sent it is the suspect. The broker acknowledging the suspect clears it. (A message sent
after it and acknowledged would clear it too, but paho stamps every message it holds at the
CONNACK, those it sent before the resend too: which came first on the wire is not known.) When
the same message is the suspect of ``CLOSES`` closes in a row, each within ``SOON_S`` of its
send (after the first, paho's resend right after the CONNACK), it is over the limit: the limit
is below its size, and that bound is applied to every later publish.

The bound is provisional: it holds until the agent restarts, or until the first connect
``LAPSE_S`` after it was learned, and is learned again if still true. After ``EXACT_VERDICTS``
verdicts in a boot (a client asking for answers just under each bound in turn, each costing
``CLOSES`` drops), each verdict takes at least an eighth off the bound: a client gets a few
steps, not one a byte, at the cost of a bound up to an eighth below the broker's limit.

``PacketLimit`` is the session's side: it keeps the size and the owner of each message paho
holds, and once a verdict is in, removes from paho's queue, with paho's network loop stopped,
the message and any other over the bound, and tells each one's owner (a reply becomes a short
refusal). paho has no call that removes one message (``drop_out_messages`` drops them all, and
putting the others back would give them new mids): its own queue is used under its own lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.reconnect import CONNECTION_LOST, TakeoverWatch
from modelpack.errors import BrokerError

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

SOON_S = 1.0  # a close this soon after a message's (re)send can be its fault: a broker reads
# a packet's header as it comes, and closes at once; a link drops at any time
CLOSES = 3  # closes in a row blamed on one message: a verdict (MQTT 3.1.1)
EXACT_VERDICTS = 3  # per boot, each a byte under the message; later ones an eighth off
LAPSE_S = 3600.0  # a learned bound lapses at the first connect this long after its verdict
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
    seq: int = 0  # its publish's number: a mid is used again after 65535 publishes


@dataclass(frozen=True)
class Blame:
    """The message a close is blamed on, and how many closes in a row it was blamed on;
    ``bound`` is set on a verdict: the largest packet the broker may take (below its size)."""

    message: Unacked
    bound: int | None = None
    closes: int = 1


class PacketLimitWatch:
    """Tells, from closes with no reason or with 0x95, a message over the broker's packet limit."""

    def __init__(self, soon_s: float = SOON_S, floor: int = MIN_SUSPECT) -> None:
        self.soon_s, self.floor = soon_s, floor
        self.acked_max = 0  # the largest packet the broker acknowledged since the CONNACK
        self.bound: int | None = None  # learned: the broker takes no packet larger
        self.verdicts = 0
        self._learned_at: float | None = None
        self.suspect: Unacked | None = None  # the message the last closes were blamed on
        self._closes = 0

    def connected(self, now: float) -> None:
        """A CONNACK: maybe another broker, or one restarted with a lower limit."""
        self.acked_max = 0
        if self._learned_at is not None and now - self._learned_at >= LAPSE_S:
            log.info("the packet bound learned %.0fs ago (%s bytes) lapses", LAPSE_S, self.bound)
            self.bound, self._learned_at, self.verdicts = None, None, 0

    def acked(self, size: int, suspect: bool = False) -> None:
        """The broker acknowledged a packet; ``suspect``: the suspect, which is not over its
        limit then."""
        self.acked_max = max(self.acked_max, size)
        if suspect:
            self.explained()

    def explained(self) -> None:
        """A connection ended for a known reason, or a connect failed: not in a row."""
        self.suspect, self._closes = None, 0

    def closed(self, now: float, unacked: Iterable[Unacked], told: bool = False) -> Blame | None:
        """A connection the broker accepted was closed with no reason (or ``told``: by an MQTT 5
        broker's DISCONNECT 0x95, a verdict at once): whom it is blamed on."""
        above = max(self.acked_max, self.floor)
        candidates = [u for u in unacked if u.size > above and now - u.sent_at <= self.soon_s]
        previous, closes = self.suspect, self._closes
        self.explained()
        if not candidates:
            return None
        # The last suspect again (telemetry sends new batches after a reconnect: a larger
        # message may join it), else the largest: over the limit if any sent is.
        same = [
            u for u in candidates if previous and (u.mid, u.seq) == (previous.mid, previous.seq)
        ]
        blamed = same[0] if same else max(candidates, key=lambda u: u.size)
        closes = closes + 1 if same else 1
        if told or closes >= CLOSES:
            return Blame(blamed, self._verdict(blamed, now), closes)
        self.suspect, self._closes = blamed, closes
        return Blame(blamed, None, closes)

    def _verdict(self, message: Unacked, now: float) -> int:
        bound = message.size - 1
        if self.verdicts >= EXACT_VERDICTS and self.bound is not None:  # stepped down again
            bound = min(bound, max(self.floor, self.bound - self.bound // 8))
        self.bound = bound if self.bound is None else min(self.bound, bound)
        self.verdicts += 1
        self._learned_at = now
        return self.bound


class PacketLimit:
    """The session's side of the rule, over its paho client."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.watch = PacketLimitWatch()
        self.refused = 0  # messages removed from paho's queue: over the learned limit
        self._held: dict[int, tuple[int, TooLarge | None, int]] = {}  # mid -> size, owner, number
        self._numbers = itertools.count(1)
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
        # paho 2.2's lock is an RLock: ``client.publish`` takes it again inside.
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
                self._held[info.mid] = (size, on_too_large, next(self._numbers))
        return info

    def acked(self, mid: int) -> None:
        """paho's on_publish: a QoS 1 message's PUBACK (a QoS 0 one's send: not held)."""
        held = self._held.pop(mid, None)
        if held is None:
            return
        size, _, number = held
        with self._lock:
            suspect = self.watch.suspect  # a mid is used again: the number tells them apart
            self.watch.acked(size, suspect is not None and number == suspect.seq)

    def connected(self, now: float) -> None:
        with self._lock:
            self.watch.connected(now)

    def explained(self) -> None:
        with self._lock:
            self.watch.explained()

    def ended(
        self,
        takeover: TakeoverWatch,
        now: float,
        reason: int,
        from_broker: bool,
        v5: bool,
        accepted: bool,
    ) -> float | None:
        """A connection ended (paho's on_disconnect): a message over the limit, or a close for
        the takeover watch. Its delay before reconnecting when a takeover is likely, or None."""
        # MQTT 5: only a broker that says "packet too large"; MQTT 3.1.1: a close with no reason.
        told = v5 and from_broker and reason == PACKET_TOO_LARGE
        unexplained = told or (not v5 and not from_broker and reason == CONNECTION_LOST)
        blame = self.closed(now, told) if unexplained and accepted else None
        if blame is not None and blame.bound is not None:  # a verdict: no takeover
            takeover.explained()
            return None
        if blame is None:
            self.explained()
        elif blame.closes > 1:  # a row's later closes wait for its verdict
            return None
        return takeover.lost(now, reason, from_broker)  # a suspicion: a takeover may be

    def closed(self, now: float, told: bool = False) -> Blame | None:
        """On paho's thread, from its on_disconnect: read what it holds, change nothing."""
        with self.client._out_message_mutex:
            unacked = []
            for m in self.client._out_messages.values():
                if m.state in _SENT:
                    size, _, number = self._held.get(m.mid, (0, None, 0))
                    unacked.append(Unacked(m.mid, m.topic, size, m.timestamp, number))
            with self._lock:
                blame = self.watch.closed(now, unacked, told)
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
            over = [m for m in queue.values() if self._held.get(m.mid, (0,))[0] > bound]
            for m in over:
                queue.pop(m.mid, None)
            held = [(m, self._held.pop(m.mid)) for m in over]  # under the lock ``acked`` takes
        self.refused += len(over)
        log.error(
            "the broker closed the connection %d time(s) in a row right after this agent sent "
            "a message of %d bytes to %r, before acknowledging it: it is over the broker's "
            "packet limit (max_packet_size). Not sent again; nothing over %d bytes is published "
            "until the agent restarts or for %.0fs (%d message(s) removed). Set "
            "max_packet_bytes to the broker's limit to say it at the start",
            verdict.closes,
            offender.size,
            offender.topic[:200],
            bound,
            LAPSE_S,
            len(over),
        )
        for m, (size, owner, _) in held:
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
