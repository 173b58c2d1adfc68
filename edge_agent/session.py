"""The MQTT session: one paho-mqtt 2.x client, kept connected for as long as the agent runs.

Reconnects with capped, jittered backoff that resets after a successful CONNACK, re-sends the
subscriptions when the broker kept no session for us, and stops for good (``AuthError``) when
the broker rejects the credentials, because retrying a wrong password never helps. When another
client takes our client id, it says so and waits longer after each time (``reconnect``).

No message can keep a device off the broker. Each is acknowledged as it arrives, before it is
handled: whatever its handling does (a crash, a reply the broker refuses), the broker never
delivers it again at the next connect (``incoming``). And nothing is published that the broker would drop the
connection for: a topic that is not a valid topic name, or a packet over the broker's maximum
(said by an MQTT 5 broker, set in the config, or learned from an MQTT 3.1.1 broker that drops us
for a message: ``packet_limit``, which also takes that message out of paho's resend queue),
nor a CONNECT: the last will in it is bounded, and cut to fit a limit known (``last_will``).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.protocol import topic_name_problem
from cloud_sync.redact import redact_url
from edge_agent.config import AgentConfig
from edge_agent.incoming import Incoming, Router
from edge_agent.last_will import LastWill, WillSource
from edge_agent.mqtt_client import acknowledged, certificate_problem, connect, make_client
from edge_agent.packet_limit import PacketLimit, TooLarge, packet_size
from edge_agent.reconnect import CONNECTION_LOST, TAKEOVER_CAP_S, Backoff, TakeoverWatch
from modelpack.errors import AuthError, BrokerError

log = logging.getLogger(__name__)

# CONNACK codes that mean "these credentials will never work" (MQTT 5 and 3.1.1 as paho maps them).
_AUTH_FAILURES = {134, 135, 138, 140, 4, 5}
_CLOSED = "the connection was closed, no reason given (no DISCONNECT from the broker)"
STOP_S = 2.0  # a stop waits this long for the broker to acknowledge what it sends


class Session:
    """A context-managed MQTT connection with a last will and locally tracked subscriptions."""

    def __init__(
        self,
        config: AgentConfig,
        will: WillSource,
        on_message: Callable[[Incoming], None],
        on_connect: Callable[[bool], None] | None = None,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.v5 = config.protocol == "5"
        self.incoming = Router(on_message)
        self._on_connect_cb = on_connect
        self._on_fatal_cb = on_fatal  # ``fatal`` was set: whoever waits on the session stops
        self._subscriptions: dict[str, int] = {}
        self._accepted = False  # a CONNACK on the current connection attempt
        self._told_refusal = False
        self._connected = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal: BrokerError | None = None
        self.backoff = Backoff(config.backoff_min, config.backoff_max)
        self.client_id = config.client_id or f"edge-agent-{config.device}"
        self.takeover = TakeoverWatch(self.client_id, max(TAKEOVER_CAP_S, config.backoff_max))
        self._takeover_delay: float | None = None  # set when a connection ends
        self.connects = 0
        self.client, self._tls = make_client(config, self.client_id)
        self.will = LastWill(will, self.client_id, config)  # made again before each connect
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self.incoming.handle
        self.limit = PacketLimit(self.client, config.max_packet_bytes)
        self.client.on_publish = lambda client, userdata, mid, *rest: self.limit.acked(mid)

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def max_packet(self) -> int:
        """The largest packet published: the broker's limit once known."""
        return self.limit.max_packet

    # --- subscriptions and publishing ---------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscriptions[topic] = qos
        if self.connected:
            self.client.subscribe(topic, qos)

    def route(self, topic_filter: str, handler: Callable[[Incoming], None]) -> None:
        """Messages on ``topic_filter`` go to ``handler``, not to the agent's dispatcher."""
        self.incoming.routes.append((topic_filter, handler))
        self.subscribe(topic_filter, 1)

    def use_identity(self, cert_file: Path, key_file: Path) -> None:
        """Reconnect with another client certificate (a rotation). The broker keeps the session
        (same client id, clean start off), and paho sends again what was not acknowledged."""
        if self._tls is None:
            raise BrokerError("a client certificate needs an mqtts:// broker")
        self._tls.load_cert_chain(str(cert_file), str(key_file))
        self._connected.clear()  # wait_connected() now waits for the new connection
        self.client.disconnect()  # a normal DISCONNECT: no last will, and _run reconnects

    def refusal(
        self, topic: str, payload: bytes | str, correlation_data: bytes | None = None
    ) -> str | None:
        """Why the broker would drop us for publishing this, or None."""
        problem = topic_name_problem(topic, self.config.max_topic_bytes)
        if problem is not None:
            return f"the topic {topic[:80]!r} is not a valid topic name: {problem}"
        size = packet_size(topic, payload, correlation_data)
        if size > self.max_packet:
            return f"the message is {size} bytes; the broker takes at most {self.max_packet}"
        return None

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        on_too_large: TooLarge | None = None,
        hold: bool = True,
    ) -> mqtt.MQTTMessageInfo:
        """Raises BrokerError, sending nothing, for what the broker would drop us for.
        ``on_too_large`` is told why if the broker drops us for it all the same (MQTT 3.1.1: a
        limit it cannot say), when it is taken out of paho's queue, never to be sent again.
        ``hold``: False sends it at once even while what a close was blamed on waits out the
        quiet (``packet_limit``), ahead of it (the stop's last words)."""
        refused = self.refusal(topic, payload, correlation_data)
        if refused is not None:
            raise BrokerError(f"not published: {refused}")
        properties = None
        if self.v5 and correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        size = packet_size(topic, payload, correlation_data)
        return self.limit.publish(topic, payload, qos, retain, properties, size, on_too_large, hold)

    # --- paho callbacks (on paho's network thread) -------------------------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            if reason.value in _AUTH_FAILURES:
                self.fatal = AuthError(
                    f"broker {redact_url(self.config.broker)} rejected the credentials of "
                    f"{self.config.username or 'an anonymous client'}: {reason}; not retrying"
                )
                if self._on_fatal_cb is not None:
                    self._on_fatal_cb()
            log.warning("broker refused the connection: %s", reason)
            client.disconnect()
            return
        self.backoff.reset()
        self.takeover.accepted(time.monotonic())
        self._accepted, self._told_refusal = True, False
        self.connects += 1
        told = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.limit.connected(time.monotonic(), told if isinstance(told, int) else None)
        # Subscribing again is idempotent, and needed even with a session present: the broker
        # may hold one made under another configuration (prefix, groups), and it is what makes
        # the broker resend the retained desired state on every connect.
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)
        self._lost.clear()
        self._connected.set()
        log.info(
            "connected to %s (session present: %s)",
            redact_url(self.config.broker),
            flags.session_present,
        )
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb(bool(flags.session_present))
            except Exception:  # paho 2 would end its network thread
                log.exception("on_connect handler failed")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        if self._stop.is_set():
            self._lost.set()
            return
        from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        # paho says "Unspecified error" for a socket closed without a DISCONNECT: say that.
        said = reason if from_broker or reason.value != CONNECTION_LOST else _CLOSED
        log.warning("disconnected from %s: %s", redact_url(self.config.broker), said)
        # Before _lost is set: _run reads the delay once it is.
        self._takeover_delay = self.limit.ended(
            self.takeover, time.monotonic(), reason.value, from_broker, self.v5, self._accepted
        )
        self._lost.set()
        if not self._accepted and self.config.cert_file and not self._told_refusal:
            # TLS 1.3 reports a refused client certificate after the handshake, as a
            # dropped connection: say what is likely wrong, once per streak.
            self._told_refusal = True
            log.error("%s", certificate_problem(self.config.cert_file))

    # --- the connection loop -------------------------------------------------------------------

    def _connect_once(self) -> bool:
        cfg = self.config
        self._accepted = False
        self.will.set(self.client, self.max_packet)  # paho sends it in CONNECT
        try:
            connect(self.client, cfg)
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot reach broker %s: %s", redact_url(cfg.broker), exc)
            self.takeover.unreachable()
            self.limit.explained()
            return False
        self.limit.hold_back()  # before the loop reads the CONNACK, at which paho resends
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._connect_once():
                self._lost.clear()
                self.client.loop_start()
                while not self._stop.is_set() and not self._lost.wait(
                    0.05 if self.limit.holding else 0.5
                ):
                    self.limit.release(time.monotonic())  # what waited out the quiet
                if self._stop.is_set():
                    return
                self.client.loop_stop()
                self.limit.drop_refused()  # before the next connect, which would resend it
                if self.fatal is not None:
                    log.error("%s", self.fatal)
                    return
            # Another client with our client id: the takeover's longer wait, not the usual.
            delay, self._takeover_delay = self._takeover_delay, None
            if delay is None:
                delay = self.backoff.next()
            log.info("reconnecting in %.2fs", delay)
            self._stop.wait(delay)

    def start(self) -> Session:
        self._thread = threading.Thread(target=self._run, name="mqtt-session", daemon=True)
        self._thread.start()
        return self

    def stop(self, last_words: tuple[str, bytes] | None = None) -> None:
        """Publish ``last_words`` (retained) if connected, send what waits out the quiet
        after a close (``packet_limit``: a reply held back is not lost to a stop), all within
        ``STOP_S``, then disconnect cleanly."""
        deadline = time.monotonic() + STOP_S
        words = last_words if self.connected else None
        # A held message on their (retained) topic is older: sent after, it would replace them.
        superseded = self.limit.supersede(words[0]) if words is not None else 0
        if words is not None:  # first: a message held back may be over the limit
            with contextlib.suppress(RuntimeError, ValueError, BrokerError):  # never stops a stop
                info = self.publish(words[0], words[1], qos=1, retain=True, hold=False)
                info.wait_for_publish(STOP_S)
        if self.limit.holding or superseded:
            sent, unsent = self.limit.release_now(time.monotonic(), self.connected)
            unacked = sum(not acknowledged(info, deadline) for info in sent)
            if unsent or superseded or unacked:
                log.warning(
                    "stopping with %d message(s) held back after a close: %d never sent (the "
                    "connection was down), %d older than the status just sent on its topic, "
                    "%d sent and not acknowledged",
                    len(sent) + unsent + superseded, unsent, superseded, unacked,
                )  # fmt: skip
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
