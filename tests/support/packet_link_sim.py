"""A link that drops MQTT 3.1.1 connections at random ages, and one large message sent over it
through the real ``PacketLimitWatch``: shared by the packet-limit unit tests and
``benchmarks/packet_limit_false_bounds.py`` (which documents the model)."""

from __future__ import annotations

import random

from edge_agent.packet_evidence import PacketLimitWatch, Unacked

SIZE = 20_000  # the message's bytes


def held_send(watch: PacketLimitWatch, drop: float, lag: float) -> float | None:
    """When the held-back message goes (as the session: ``lag`` after ``quiet_until``, if
    ``send_now``), or None when the link drops first."""
    at = watch.quiet_until + lag
    while at < drop:
        if watch.send_now(at):
            return at
        at = watch.quiet_until + lag
    return None


def one_message(rng: random.Random, uplink_s: float, rtt: float, drop_max: float, most: int) -> str:
    """``"delivered"``, ``"false"`` (a verdict: refused under a false bound) or ``"open"``."""
    watch = PacketLimitWatch(draw=rng.random)
    now = 0.0
    watch.connected(now)
    drop = now + rng.uniform(0.0, drop_max)
    published = now + rng.uniform(0.0, drop_max)
    sent: float | None = published if published < drop else None
    for _ in range(most):
        if sent is not None and sent + uplink_s + rtt <= drop:
            return "delivered"
        unacked = [] if sent is None else [Unacked(1, "replies/1", SIZE, sent, 1)]
        blame = watch.closed(drop, unacked)
        if blame is not None and blame.bound is not None:
            return "false"
        now = drop + rng.uniform(1.0, 3.0)
        watch.connected(now)
        drop = now + rng.uniform(0.0, drop_max)
        lag = rtt + rng.uniform(0.0, 0.1)
        sent = held_send(watch, drop, lag) if watch.suspect is not None else now
    return "open"
