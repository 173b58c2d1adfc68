"""How often random link drops teach the MQTT 3.1.1 packet-limit rule a false bound, and what a
real over-limit message pays for the rule, as ``packet_evidence.CLOSES`` varies (a Monte Carlo
with the real ``PacketLimitWatch``; not part of ``make bench``).

The model: a broker that takes everything, a link that drops each connection at an age drawn
uniformly in [0, ``--drop-max``] s after its CONNACK, a reconnect 1 to 3 s after each drop, a
round trip of ``--rtt`` s, and an uplink that needs ``T`` s to carry the large message after it
is sent (its PUBACK comes ``T`` + the round trip after the send; a drop before that loses it).
The message is published at a random age of its first connection (or sent at the next CONNACK);
paho sends it again at each CONNACK unless the watch holds it back, and the session sends a held
one a round trip (and up to 0.1 s of polling) after ``quiet_until``, as ``send_now`` lets it.

  * ``refused``: the share of messages refused under a false bound (a verdict before the
    message got through), for several ``T``;
  * ``resent``: a message the link never lets through (``T`` past every connection): the share
    of runs that reach a false bound within 200 reconnects;
  * ``verdict``: a message over a real limit (the broker closes a round trip after each send):
    seconds from its first send to its verdict, on a link that does not drop.

    python -m benchmarks.packet_limit_false_bounds [--runs 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from edge_agent import packet_evidence
from edge_agent.packet_evidence import PacketLimitWatch, Unacked
from tests.support.packet_link_sim import SIZE, held_send, one_message


@contextmanager
def closes(count: int) -> Iterator[None]:
    """The rule with ``count`` closes to a verdict (the module's constant, as ``closed`` reads)."""
    old, packet_evidence.CLOSES = packet_evidence.CLOSES, count
    try:
        yield
    finally:
        packet_evidence.CLOSES = old


def verdict_time(rng: random.Random, rtt: float) -> float:
    """A message over a real limit: seconds from its first send to its verdict (the broker
    closes a round trip after each send; the reconnect takes 1 to 3 s)."""
    watch = PacketLimitWatch(draw=rng.random)
    now = 0.0
    watch.connected(now)
    sent = first = rng.uniform(0.0, 5.0)
    while True:
        close = sent + rtt
        blame = watch.closed(close, [Unacked(1, "replies/1", SIZE, sent, 1)])
        if blame is not None and blame.bound is not None:
            return close - first
        now = close + rng.uniform(1.0, 3.0) + rtt  # the reconnect, and its CONNACK
        watch.connected(now)
        held = held_send(watch, float("inf"), rtt + rng.uniform(0.0, 0.1))
        assert held is not None
        sent = held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rtt", type=float, default=0.3)
    parser.add_argument("--drop-max", type=float, default=5.0)
    parser.add_argument("--closes", type=int, nargs="+", default=[3, 4, 5])
    args = parser.parse_args()
    results = []
    for count in args.closes:
        with closes(count):
            rng = random.Random(args.seed)
            refused = {}
            for uplink_s in (0.5, 1.0, 2.0, 3.0):
                ends = [
                    one_message(rng, uplink_s, args.rtt, args.drop_max, 200)
                    for _ in range(args.runs)
                ]
                refused[uplink_s] = ends.count("false") / len(ends)
            runs = args.runs // 10
            resent = [one_message(rng, 1e9, args.rtt, args.drop_max, 200) for _ in range(runs)]
            times = [verdict_time(rng, args.rtt) for _ in range(args.runs // 10)]
            row = {
                "closes": count,
                "refused_by_uplink_s": {f"{t:g}": round(r, 5) for t, r in refused.items()},
                "resent_false_within_200": round(resent.count("false") / runs, 4),
                "verdict_s_median": round(statistics.median(times), 2),
                "verdict_s_max": round(max(times), 2),
            }
        results.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
