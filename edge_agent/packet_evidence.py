"""How a message over an MQTT 3.1.1 broker's packet limit is told from a link that drops.

A link that drops (a slow uplink, a broker restarted) looks the same at each close, so the
evidence is a pattern (``PacketLimitWatch``). The suspect of a close with no reason given is the
largest message sent (or sent again) within ``SOON_S`` before it and not acknowledged, larger
than ``MIN_SUSPECT`` and than any packet the broker acknowledged since the CONNACK (a broker that
took a packet takes any smaller one; an earlier connection may have been to a broker with a
higher limit). Any message over the limit is larger than every message under it, so when one
was sent it is the suspect. The broker acknowledging the suspect clears it. (A message sent
after it and acknowledged would clear it too, but paho stamps every message it holds at the
CONNACK, those it sent before the resend too: which came first on the wire is not known.)

Closes alone cannot tell the two apart: a link that drops within ``SOON_S`` of each reconnect
drops within ``SOON_S`` of paho's resend of whatever it holds. So the agent makes the test that
can: while a row is open, the next connection first holds without the suspect. The session
keeps the suspect, and every message as large as a candidate of the last close, out of paho's
resend at the CONNACK (``hold_above``; ``packet_limit.PacketLimit.hold_back``; with any later
message on their topics, which must not overtake them), and sends them, in the order they were
published, only once the connection has held without them until their release
(``quiet_until``), and carried a round trip (a PUBACK, or the PINGRESP to a PINGREQ the session
sends then). A close before that, with the suspect unsent, is the link's (or a takeover's, or a
broker's restart): it ends the row. A close within ``SOON_S`` after the suspect's own send, on
a connection that held without it, counts for it. When the same message is the suspect of
``CLOSES`` closes in a row, every one after the first right after its release, it is over the
limit: the limit is below its size, and that bound is applied to every later publish.

The release is where a link that drops at one age of each connection (a middlebox's timer, a
radio's duty cycle) cannot be. After the row's last close's age ``L`` if that was early (under
``EARLY_S``, 3 s), or if it came right after an early release (a lag may have put it at 3 s or
later): at ``max(SOON_S, L)`` and a random ``JITTER_S`` more, so a drop at that age again (or up
to 0.25 s later) finds the suspect held. Else early: at ``SOON_S`` and the jitter, under 2 s, so
a drop at that age again, or at any age of 3 s or more, comes over ``SOON_S`` after the send and
is no evidence. The send comes a lag ``d`` after the release (the round trip the session waits
for), so it is decided at the send (``send_now``): not in the ``SOON_S`` and 0.25 s before
``L``, nor from ``L`` to its late release (``L`` and the jitter), where it waits for that.

What that covers, each connection with its own lag ``d`` (the tests draw 0 to 1 s a connection):
a link that drops at one fixed age, whatever the age, the draws and the lags (a drop at ``L``,
0.25 s either way, finds the suspect sent over ``SOON_S`` before, or held); any repeated pattern
of ages each 3 s and the largest lag or more into their connections; an age that wanders (each
drop under 0.25 s later than the last, or any amount earlier). Not covered: drops between 3 s
and 3 s + ``d`` (a lag puts an early send in the second before them), and drops under 5 s into
their connections, each of the ``CLOSES - 1`` after the first in the second after a release the
link cannot see coming, with the suspect black-holed (else it is acknowledged). No rule whose
hold is at most ``H`` s can refuse every such pattern: some age lands in the second after the
release with probability 1/H at least, on each connection. So a verdict takes ``CLOSES`` (5)
closes: each one more cuts such false bounds about 5 times (``benchmarks/
packet_limit_false_bounds.py``: drops uniform in [0, 5] s, a 0.3 s round trip, a message that
needs 3 s of uplink: refused under a false bound 3.0% of the time with 3 closes, 0.57% with 4,
0.13% with 5), and such a bound lapses. A real message over the limit costs ``CLOSES - 1``
holds of 1.25 to 4 s, each with a reconnect and the lag ``d``: about 10 to 12 s through a local
Mosquitto (4.7 to 5.6 s with 3 closes).

The bound is never below the largest packet the broker acknowledged on the connection of the
verdict's close (the suspect is larger). It may be below one acknowledged on an earlier
connection of this boot, only by an exact verdict: a broker restarted with a lower
``max_packet_size`` (or another after a fail-over) drops the device for a message it once took,
and a floor kept from the old one would keep the device off the new one for ever (that case has
its own test). The held-back test stands between a flaky link and such a bound.

The bound is provisional: it holds until the agent restarts, or until the first connect
``LAPSE_S`` after it was learned, and is learned again if still true. After ``EXACT_VERDICTS``
verdicts in a boot (a client asking for answers just under each bound in turn, each costing
``CLOSES`` drops), each verdict takes at least an eighth off the bound: a client gets a few
steps, not one a byte, at the cost of a bound up to an eighth below the broker's limit, and
never below the largest packet the broker acknowledged in this boot (a step is no evidence).

The rule is pure (``PacketLimitWatch``: closes and acknowledgements in, a verdict out); the
session's side, over paho's queue, is ``edge_agent.packet_limit``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

SOON_S = 1.0  # a close this soon after a message's (re)send can be its fault: a broker reads
# a packet's header as it comes, and closes at once; a link drops at any time
CLOSES = 5  # closes in a row blamed on one message: a verdict (MQTT 3.1.1; why 5: the docs)
EXACT_VERDICTS = 3  # per boot, each a byte under the message; later ones an eighth off
LAPSE_S = 3600.0  # a learned bound lapses at the first connect this long after its verdict
MIN_SUSPECT = 1024  # bytes; no broker's limit is below (nor ``max_packet_bytes``'s floor)
# The release waits a random extra this long past its age: never at an age a link could keep to.
# Above 0: a drop at the age of the last close again finds the suspect held.
JITTER_S = (0.25, 1.0)
# A row whose last close came this late in its connection or later is released early, at
# ``SOON_S`` and the jitter (under 2 s): a drop at that age again, or at any age this late, comes
# over ``SOON_S`` after the send (``PacketLimitWatch.early``: from the watch's own ``soon_s``).
EARLY_S = 2 * SOON_S + JITTER_S[1]


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

    def __init__(
        self,
        soon_s: float = SOON_S,
        floor: int = MIN_SUSPECT,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.soon_s, self.floor = soon_s, floor
        self.early = 2 * soon_s + JITTER_S[1]  # ``EARLY_S`` for this ``soon_s``
        self.draw = draw  # in [0, 1): the release's jitter, one draw per connection
        self.close_age = 0.0  # while a row is open: its last close, seconds after its CONNACK
        self._jitter = 0.0
        self._late = False  # this connection's early release came too near the close's age
        self._sent_early = False  # the suspect's last send was an early release
        self._after_early = False  # the row's last close came right after an early release
        self.acked_max = 0  # the largest packet the broker acknowledged since the CONNACK
        self.acked_boot = 0  # ... since the agent started, on any connection
        self.bound: int | None = None  # learned: the broker takes no packet larger
        self.verdicts = 0
        self._learned_at: float | None = None
        self.suspect: Unacked | None = None  # the message the last closes were blamed on
        self.hold_above = 0  # while a row is open: what is larger waits out the quiet
        self._closes = 0
        self.connected_at = 0.0  # monotonic: the last CONNACK

    def connected(self, now: float) -> None:
        """A CONNACK: maybe another broker, or one restarted with a lower limit."""
        self.acked_max, self.connected_at, self._late = 0, now, False
        self._sent_early = False
        low, high = JITTER_S
        self._jitter = low + (high - low) * self.draw()
        if self._learned_at is not None and now - self._learned_at >= LAPSE_S:
            log.info("the packet bound learned %.0fs ago (%s bytes) lapses", LAPSE_S, self.bound)
            self.bound, self._learned_at, self.verdicts = None, None, 0

    def acked(self, size: int, suspect: bool = False) -> None:
        """The broker acknowledged a packet; ``suspect``: the suspect, which is not over its
        limit then."""
        self.acked_max = max(self.acked_max, size)
        self.acked_boot = max(self.acked_boot, size)
        if suspect:
            self.explained()

    def explained(self) -> None:
        """A connection ended for a known reason, or a connect failed: not in a row."""
        self.suspect, self._closes, self.close_age = None, 0, 0.0
        self._after_early = False

    def closed(self, now: float, unacked: Iterable[Unacked], told: bool = False) -> Blame | None:
        """A connection the broker accepted was closed with no reason (or ``told``: by an MQTT 5
        broker's DISCONNECT 0x95, a verdict at once): whom it is blamed on."""
        above = max(self.acked_max, self.floor)
        quiet = self.quiet_until  # of the connection that closed (``explained`` resets it)
        candidates = [u for u in unacked if u.size > above and now - u.sent_at <= self.soon_s]
        previous, closes = self.suspect, self._closes
        self.explained()
        if not candidates:
            return None
        # The last suspect again (telemetry sends new batches after a reconnect: a larger
        # message may join it), else the largest: over the limit if any sent is. The suspect
        # counts again only when it was sent after the connection held for ``soon_s`` without
        # it (the session holds it back, ``quiet_until``): a link that drops soon after each
        # reconnect drops with it held, which ends the row (it is not in ``unacked`` then).
        same = [
            u
            for u in candidates
            if previous is not None
            and (u.mid, u.seq) == (previous.mid, previous.seq)
            and (told or u.sent_at >= quiet)
        ]
        blamed = same[0] if same else max(candidates, key=lambda u: u.size)
        closes = closes + 1 if same else 1
        if told or closes >= CLOSES:
            return Blame(blamed, self._verdict(blamed, now), closes)
        self.suspect, self._closes, self.hold_above = blamed, closes, above
        self.close_age = now - self.connected_at
        # Right after an early release (its lag may have put this close at EARLY_S or later):
        # the next release comes after this age, so a drop no later finds the suspect held.
        self._after_early = same != [] and self._sent_early
        return Blame(blamed, None, closes)

    @property
    def quiet_until(self) -> float:
        """While a row is open, the suspect is sent again only this long after the CONNACK:
        after the age of the row's last close and a jitter, or early if that close was late."""
        late = self._late or self._after_early
        age = self.close_age if late or self.close_age < self.early else 0.0
        return self.connected_at + max(self.soon_s, age) + self._jitter

    def send_now(self, now: float) -> bool:
        """At the suspect's actual send, ``now`` its stamp (after ``quiet_until``, by a lag: the
        round trip the session waits for, its polling): whether it may go. Not in the ``SOON_S``
        (and ``JITTER_S[0]``) before the last close's age, up to its late release: a drop at that
        age again (0.25 s either way) would come right after it. Then it waits for that release,
        after the age (``quiet_until``), whatever the lag."""
        close = self.connected_at + self.close_age
        late = self.connected_at + max(self.soon_s, self.close_age) + self._jitter  # as quiet_until
        near = close - self.soon_s - JITTER_S[0] <= now < late
        self._late = self._late or near
        early = not self._late and not self._after_early and self.close_age >= self.early
        self._sent_early = not near and early
        return not near

    def _verdict(self, message: Unacked, now: float) -> int:
        bound = message.size - 1
        if self.verdicts >= EXACT_VERDICTS and self.bound is not None:  # stepped down again
            # Never below what the broker took in this boot: a step is no evidence.
            known = max(self.floor, self.acked_max, self.acked_boot)
            bound = min(bound, max(known, self.bound - self.bound // 8))
        self.bound = bound if self.bound is None else min(self.bound, bound)
        self.verdicts += 1
        self._learned_at = now
        return self.bound
