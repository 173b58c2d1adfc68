"""When the session reconnects: capped jittered backoff, and what to do when another client
takes our client id.

A broker keeps one connection per client id: a second client that connects with ours (a cloned
device image, two devices given one name, a stale process) makes it close ours. Two such
clients each reconnect within the backoff and take the session back, for ever, and each loses
what the broker delivers to the other meanwhile (with a kept session the subscriptions are both
clients' and either may get any message).

What the agent sees of it (measured with paho-mqtt 2.2 on Debian's Mosquitto 2.0.11; later
versions from Mosquitto's source, where 2.0.15 added the DISCONNECT: commit 351911bd, #2607):

- MQTT 5, a broker that says so as the specification asks (Mosquitto 2.0.15 and later): a
  DISCONNECT with reason code 0x8E "Session taken over". Certain.
- MQTT 5 on Mosquitto up to 2.0.14 (Debian's 2.0.11 included), and MQTT 3.1.1 on any broker:
  the socket is closed and nothing is said. paho reports it as its code for a lost connection,
  "Unspecified error" (128), as it reports a network fault or a broker that restarts. One such
  drop says nothing; the pattern does: the broker accepted us, then closed an established
  connection, ``SUSPECT_AFTER`` times in a row, each soon (``SUSPECT_WITHIN_S``) after the
  reconnect the drop before it made, every reconnect accepted at once. A drop that
  ``packet_limit`` blames on a message over the broker's packet limit (the same pattern, from a
  message paho sends again at each reconnect) cannot be told apart at once: the first drop
  blamed on a message counts here as any other, the next ones for it wait, and its verdict
  calls ``explained(take_back=True)``, which takes back what that first drop counted (with an
  unexplained drop just before it, a broker restarted or a link cut, the two made a streak,
  counted as two takeovers). A takeover while each drop finds a new, larger message is still
  told, and a drop while the suspect is held back (``packet_evidence``) is any other drop.

Either way the agent logs one ERROR per streak naming the client id, counts each takeover, and
waits longer after each (``TAKEOVER_BASE_S`` doubling up to ``TAKEOVER_CAP_S``) instead of its
usual backoff, so two agents with one id take turns every minute, not every 0.3 s. It never
stops for good: the other may be a stale process that goes away. A connection that lasts
``stable_s`` (twice the cap: longer than the other client ever waits) ends the streak.
"""

from __future__ import annotations

import logging
import random
import threading

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code
CONNECTION_LOST = 128  # paho's reason for a socket closed without a DISCONNECT
SUSPECT_AFTER = 2  # unexplained drops in a row that make a takeover likely
SUSPECT_WITHIN_S = 5.0  # ... each but the first within this of the reconnect before it
TAKEOVER_BASE_S = 2.0
TAKEOVER_CAP_S = 60.0


class Backoff:
    """Exponential backoff with "equal jitter": uniform(c/2, c), c = min(cap, base * 2**attempt).

    Half the delay is random, so a fleet that lost its broker at once does not come back at once,
    and the other half keeps a device from hammering a broker that is still down.
    """

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class TakeoverWatch:
    """Tells, from how connections end, that another client uses our client id.

    Called from paho's thread (``accepted``, ``lost``) and the session's (``unreachable``);
    ``taken_over`` is read by a metrics scrape: one lock keeps them consistent.
    """

    def __init__(
        self,
        client_id: str,
        cap_s: float = TAKEOVER_CAP_S,
        rng: random.Random | None = None,
    ) -> None:
        self.client_id = client_id
        self.backoff = Backoff(TAKEOVER_BASE_S, max(cap_s, TAKEOVER_BASE_S), rng)
        self.stable_s = 2 * self.backoff.cap
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current connection was accepted
        self._streak = 0  # connections in a row ended by a takeover or unexplained
        self._counted = 0  # of the streak, those counted as takeovers
        self._told = False  # the ERROR of this streak was logged
        self._taken_over = 0
        # What the first close of a row of closes blamed on one message counted: added once the
        # row ends with no verdict, dropped on a verdict; the count never goes down.
        self._pending = 0

    @property
    def taken_over(self) -> int:
        """Connections lost to another client with our client id (certain or likely)."""
        with self._lock:
            return self._taken_over

    def accepted(self, now: float) -> None:
        with self._lock:
            self._since = now

    def unreachable(self) -> None:
        """A connect failed: the broker was down or away, not taken by another client."""
        self.explained()

    def explained(self, take_back: bool = False) -> None:
        """A connection ended, or none was made, for a reason that is no takeover (a message
        over the broker's packet limit: ``packet_limit``). ``take_back``: the verdict on a
        message explains the row of closes it ends, whose first close came here as any other
        (``lost``, pending): what that close counted is no takeover (with an unexplained drop
        before it, a broker restarted or a link cut, it made a streak of two). Else what it
        counted is added now: the row ended with no verdict."""
        with self._lock:
            pending, self._pending = self._pending, 0
            if take_back and pending:
                log.warning(
                    "the last %d drop(s) taken for client id %r taken over were for a message "
                    "over the broker's packet limit: not counted",
                    pending,
                    self.client_id,
                )
            else:
                self._taken_over += pending
            self._since = None
            self._end_streak()

    def lost(
        self, now: float, reason: int, from_broker: bool, pending: bool = False
    ) -> float | None:
        """A connection ended: the delay before reconnecting when another client likely took
        our client id, else None (the usual backoff applies). ``pending``: the first close of a
        row blamed on one message (``packet_limit``), whose verdict may explain it: what it
        counts waits for the row's end (``explained``, or the next ``lost``)."""
        with self._lock:
            since, self._since = self._since, None
            self._taken_over += self._pending  # the row before ended with no verdict
            self._pending = 0
            if since is None:  # refused or never accepted: nothing to tell
                self._end_streak()
                return None
            lasted = now - since
            if lasted >= self.stable_s:
                self._end_streak()  # a connection that lasted: a new streak starts here
            certain = from_broker and reason == SESSION_TAKEN_OVER
            if not certain and (from_broker or reason != CONNECTION_LOST):
                self._end_streak()  # a reason we know (a keepalive timeout, our own disconnect)
                return None
            if not certain and not self._told and lasted >= SUSPECT_WITHIN_S:
                # Not soon after the reconnect the last drop made: unrelated drops (a broker
                # restarted twice in an hour) are not a pattern.
                self._end_streak()
            self._streak += 1
            if not certain and self._streak < SUSPECT_AFTER:
                return None
            first, streak = not self._told, self._streak
            self._told = True
            if pending:
                self._pending = streak - self._counted
            else:
                self._taken_over += streak - self._counted
            self._counted = streak
            delay = self.backoff.next()
        self._tell(certain, first, streak, delay)
        return delay

    def _end_streak(self) -> None:
        self._streak = self._counted = 0
        self._told = False
        self.backoff.reset()

    def _tell(self, certain: bool, first: bool, streak: int, delay: float) -> None:
        if not first:
            log.warning(
                "client id %r taken over again (%d in a row); reconnecting in %.1fs",
                self.client_id,
                streak,
                delay,
            )
            return
        if certain:
            log.error(
                "another client connects with this agent's MQTT client id %r, and the broker "
                "drops one of the two for the other: the broker said so (reason 0x8E, session "
                "taken over). Another device or process uses the same client id or device name "
                "(a cloned image or config): give each its own --client-id or fix the device "
                "name. Until it goes away, messages for this device may go to the other; "
                "reconnecting in %.1fs, waiting longer after each takeover (up to %.0fs)",
                self.client_id,
                delay,
                self.backoff.cap,
            )
            return
        # Without a reason the pattern has other causes too, which the operator must be able
        # to tell from the log: a broker that closes the connection for what this agent sends
        # (over its packet limit, an ACL that disconnects) or a broker that keeps restarting.
        log.error(
            "the broker closed this agent's connection (MQTT client id %r) %d times in a row "
            "soon after accepting it, with no reason given (MQTT 3.1.1, or a broker that sends "
            "none). Most likely another device or process uses the same client id or device "
            "name (a cloned image or config): give each its own --client-id or fix the device "
            "name; messages for this device may then go to the other. Else the broker refuses "
            "something this agent sends (a message over its packet limit, a topic its ACL "
            "denies: see the broker's log) or keeps restarting. Reconnecting in %.1fs, waiting "
            "longer each time (up to %.0fs)",
            self.client_id,
            streak,
            delay,
            self.backoff.cap,
        )
