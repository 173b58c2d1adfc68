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

How a close is told from a link that drops is ``edge_agent.packet_evidence``.

``PacketLimit`` is the session's side: it keeps the size and the owner of each message paho
holds; while a row of closes is open it holds the suspect back from paho's resend at the next
CONNACK (a state paho's resend skips), with any later message on a topic of one held (it must
not overtake it), and sends them in their order once the connection held without them; and
once a verdict is in, it removes from paho's queue, with paho's network loop stopped, the
message and any other over the bound. Each one's owner is told (a reply becomes a short
refusal, a pipeline counts its result unsent), and its ``MQTTMessageInfo`` completes as failed
(``MQTT_ERR_PAYLOAD_SIZE``: ``wait_for_publish`` and ``is_published`` raise RuntimeError), so
nothing waits on it for ever. paho has no call that removes one message (``drop_out_messages``
drops them all, and putting the others back would give them new mids), nor one that holds one
back: its own queue is used under its own lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PINGREQ

from edge_agent.packet_evidence import LAPSE_S, Blame, PacketLimitWatch, Unacked
from edge_agent.reconnect import CONNECTION_LOST, TakeoverWatch
from modelpack.errors import BrokerError

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

MQTT_MAX_PACKET = 268_435_455  # what a four-byte remaining length can say
PACKET_TOO_LARGE = 0x95  # MQTT 5 DISCONNECT reason code, for a broker that says it
_SENT = (mqtt.mqtt_ms_wait_for_puback, mqtt.mqtt_ms_wait_for_pubrec)
_WAITING = mqtt.mqtt_ms_invalid  # a state paho's resend at the CONNACK skips: held back by us

TooLarge = Callable[[str], None]  # told why, when its message is over the broker's limit


def packet_size(topic: str, payload: bytes | str, correlation_data: bytes | None = None) -> int:
    """An upper bound on the PUBLISH packet's size: fixed header (5), topic, packet id,
    properties (MQTT 5: their length and the correlation data) and payload."""
    body = len(payload.encode() if isinstance(payload, str) else payload)
    extra = 4 + 3 + len(correlation_data) if correlation_data is not None else 4
    return 5 + 2 + len(topic.encode(errors="replace")) + 2 + extra + body


class PacketLimit:
    """The session's side of the rule, over its paho client."""

    def __init__(self, client: mqtt.Client, configured: int | None = None) -> None:
        self.client = client
        self.configured = configured or MQTT_MAX_PACKET  # ``max_packet_bytes``
        self.max_packet = self.configured  # the largest packet published: the broker's, once known
        self.watch = PacketLimitWatch()
        self.refused = 0  # messages removed from paho's queue: over the learned limit
        self._held: dict[int, tuple[int, TooLarge | None, int]] = {}  # mid -> size, owner, number
        self._numbers = itertools.count(1)
        self._verdict: Blame | None = None
        # mids held back from the resend, in the order published (under paho's lock)
        self._waiting: list[int] = []
        self._connack = False  # on the current connection
        # The current connection carried our data both ways since the CONNACK: a PUBACK, or the
        # PINGRESP to a PINGREQ sent once the quiet is over (``release`` waits for it).
        self._carried = False
        self._pinged = False
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
        hold: bool = True,
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
            # While the suspect waits out the quiet, so does any message as large (telemetry
            # sends its batch again at each reconnect): the connection holds without them. And
            # any on a topic with a message waiting, which it must not overtake (MQTT 3.1.1
            # section 4.6: a topic's messages arrive in the order they were published).
            wait = hold and qos > 0 and bool(self._waiting)
            wait = wait and (size > self.watch.hold_above or topic in self._waiting_topics())
            info = self._publish(topic, payload, qos, retain, properties, wait)
            if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._held[info.mid] = (size, on_too_large, next(self._numbers))
        return info

    def _publish(
        self, topic: str, payload: bytes | str, qos: int, retain: bool, props: Any, wait: bool
    ) -> mqtt.MQTTMessageInfo:
        """paho's publish; ``wait``: queued, not sent (paho queues what is over its in-flight
        maximum: one below any count, under its lock), then waiting with the suspect."""
        if not wait:
            return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        most, self.client._max_inflight_messages = self.client._max_inflight_messages, -1
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        finally:
            self.client._max_inflight_messages = most
        message = self.client._out_messages.get(info.mid)
        if message is not None and message.state == mqtt.mqtt_ms_queued:
            message.state = _WAITING
            self._waiting.append(info.mid)
        return info

    def acked(self, mid: int) -> None:
        """paho's on_publish: a QoS 1 message's PUBACK (a QoS 0 one's send: not held)."""
        held = self._held.pop(mid, None)
        if held is None:
            return
        self._carried = True  # a PUBACK came on this connection
        size, _, number = held
        with self._lock:
            suspect = self.watch.suspect  # a mid is used again: the number tells them apart
            self.watch.acked(size, suspect is not None and number == suspect.seq)

    def connected(self, now: float, told: int | None) -> None:
        """A CONNACK, and the limit it ``told`` (MQTT 5's Maximum Packet Size), if any."""
        with self._lock:
            self.watch.connected(now)  # before ``bound`` is read: it may lapse
            self._connack = True
        learned = self.bound or MQTT_MAX_PACKET  # from a broker that dropped us for one
        own = min(self.configured, learned)
        self.max_packet = own if told is None else min(own, told)

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
            # A row's first close came to the takeover watch as any other: not a takeover.
            takeover.explained(take_back=blame.closes > 1)
            return None
        if blame is None:
            self.explained()
        elif blame.closes > 1:  # a row's later closes wait for its verdict
            return None
        # A suspicion: a takeover may be. A row's first close counts once the row ends with
        # no verdict (the count a metric and the status show never goes down).
        return takeover.lost(now, reason, from_broker, pending=blame is not None)

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
                    self.max_packet = min(self.max_packet, blame.bound)
        return blame

    def hold_back(self) -> None:
        """MQTT 3.1.1, on the session's thread after ``connect()`` and before paho's loop
        reads the CONNACK (at which paho sends again all it holds): while a row of closes is
        open, its suspect, and every message as large as a candidate of its last close, wait
        for ``release``; the connection first has to hold without them."""
        with self._lock:
            suspect, above, self._connack = self.watch.suspect, self.watch.hold_above, False
            self._carried = self._pinged = False
        waiting: list[int] = []
        topics: set[str] = set()  # a later message on one of them waits too: never overtakes
        with self.client._out_message_mutex:  # paho's queue is in the order of publishing
            for m in self.client._out_messages.values() if suspect is not None else ():
                size = self._held.get(m.mid, (0, None, 0))[0]
                resent = m.qos > 0 and m.state in (mqtt.mqtt_ms_publish, mqtt.mqtt_ms_queued)
                if resent and (size > above or m.topic in topics):
                    m.state = _WAITING
                    waiting.append(m.mid)
                    topics.add(m.topic)
            self._waiting = waiting

    @property
    def holding(self) -> bool:
        return bool(self._waiting)

    def release(self, now: float) -> None:
        """On the session's thread: once the connection held until ``quiet_until`` and carried
        a round trip, send what waits, in the order it was published (a topic's order is kept;
        the evidence is not lost: any message over the limit sent now is as large as the
        suspect, which is blamed again whichever of them the broker closes for)."""
        with self._lock:
            if not self._connack or now < self.watch.quiet_until or not self._waiting:
                return
        if not self._link_carries():
            return
        with self._lock:  # the round trip may have brought the send near the last close's age
            if not self.watch.send_now(now):
                return
        self._send(now, self._waiting)

    def _link_carries(self) -> bool:
        """Whether the connection carried our data both ways since its CONNACK. A link that
        passes the CONNECT and its CONNACK and then nothing, dropping at a fixed age after the
        quiet, dropped each time right after the release: without this, a false bound."""
        if self._carried:
            return True
        if not self._pinged:  # paho's keepalive closes the connection if it never comes
            # As paho's ``_send_pingreq``, but ``_ping_t`` is set before the send: after it, on
            # this thread, it could land after the PINGRESP already cleared it.
            self.client._ping_t = time.monotonic()
            self._pinged = self.client._send_simple_command(PINGREQ) == mqtt.MQTT_ERR_SUCCESS
            return False
        self._carried = self.client._ping_t == 0  # paho's PINGRESP handler clears it
        return self._carried

    def supersede(self, topic: str) -> int:
        """The session stops and sends its retained last words on ``topic``: a message to it
        that waits is older, and would replace them; it is never sent. How many."""
        with self.client._out_message_mutex:
            queue = self.client._out_messages
            kept = [mid for mid in self._waiting if mid in queue and queue[mid].topic != topic]
            gone, self._waiting = len(self._waiting) - len(kept), kept
        return gone

    def release_now(self, now: float, connected: bool) -> tuple[list[mqtt.MQTTMessageInfo], int]:
        """The session stops: what waits is sent now, in the order it was published, without
        waiting out the quiet (a stop in the quiet lost the replies it held). The handles of
        those sent, and how many were not (the connection is down)."""
        with self.client._out_message_mutex:
            queue = self.client._out_messages
            waiting = [queue[mid] for mid in self._waiting if mid in queue]
            waiting = [m for m in waiting if m.state == _WAITING]
            go = waiting if connected else []
            self._send(now, [m.mid for m in go])
        return [m.info for m in go], len(waiting) - len(go)

    def _waiting_topics(self) -> set[str]:
        """Under paho's lock: the topics of the messages waiting."""
        queue = self.client._out_messages
        return {queue[mid].topic for mid in self._waiting if mid in queue}

    def _send(self, now: float, mids: list[int]) -> None:
        """Send the waiting ``mids`` (in the order given) and stop waiting for any."""
        with self.client._out_message_mutex:
            for mid in mids:
                m = self.client._out_messages.get(mid)
                if m is None or m.state != _WAITING:
                    continue
                m.state = (
                    mqtt.mqtt_ms_wait_for_puback if m.qos == 1 else mqtt.mqtt_ms_wait_for_pubrec
                )
                m.timestamp = now  # its DUP flag as paho's reconnect left it: set if it was sent
                self.client._inflight_messages += 1
                self.client._send_publish(
                    m.mid, m.topic.encode(), m.payload, m.qos, m.retain, m.dup,
                    properties=m.properties,
                )  # fmt: skip
            self._waiting = []

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
                # Whoever waits on its MQTTMessageInfo learns it failed (wait_for_publish and
                # is_published raise RuntimeError "Payload too large"), never waits for ever.
                m.info.rc = mqtt.MQTT_ERR_PAYLOAD_SIZE
                m.info._set_as_published()
            held = [(m, self._held.pop(m.mid)) for m in over]  # under the lock ``acked`` takes
            self._waiting = [mid for mid in self._waiting if mid in queue]
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
