"""Messages that arrive: acknowledged first, then handed to the handler of their topic.

Each is acknowledged as it arrives, before it is handled: whatever its handling does (a crash,
a reply the broker refuses), the broker never delivers it again at the next connect. Handling is
at most once: a command's effect is bound to its id, and a client that lost an answer asks again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retained: bool = False


Handler = Callable[[Incoming], None]


class Router:
    """paho's on_message: each message to the first route whose filter matches its topic, else
    to the default handler (the agent's dispatcher)."""

    def __init__(self, default: Handler) -> None:
        self.default = default
        # Topic filters whose messages go to their own handler (the identity's renewal answers).
        self.routes: list[tuple[str, Handler]] = []

    def handle(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Acknowledged first: the PUBACK leaves before anything the handling publishes, so the
        # broker has it even when a reply makes it drop us.
        client.ack(msg.mid, msg.qos)
        response_topic = correlation = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        incoming = Incoming(
            msg.topic, bytes(msg.payload), response_topic, correlation, bool(msg.retain)
        )
        handler = next(
            (h for f, h in self.routes if mqtt.topic_matches_sub(f, msg.topic)), self.default
        )
        try:
            handler(incoming)
        except Exception:  # a bug in one handler must not take the network loop down
            log.exception("handling a message on %s failed", msg.topic)
