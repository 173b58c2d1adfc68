"""The MQTT session: one paho-mqtt 2.x client, kept connected for as long as the agent runs.

Reconnects with capped, jittered backoff that resets after a successful CONNACK, re-sends the
subscriptions when the broker kept no session for us, and stops for good (``AuthError``) when
the broker rejects the credentials, because retrying a wrong password never helps. When another
client takes our client id, it says so and waits longer after each time (``reconnect``).

No message can keep a device off the broker. Each is acknowledged as it arrives, before it is
handled: whatever its handling does (a crash, a reply the broker refuses), the broker never
delivers it again at the next connect. And nothing is published that the broker would drop the
connection for: a topic that is not a valid topic name, or a packet over the broker's maximum
(said by an MQTT 5 broker, set in the config, or learned from an MQTT 3.1.1 broker that drops us
for a message: ``packet_limit``, which also takes that message out of paho's resend queue).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.protocol import topic_name_problem
from cloud_sync.redact import redact_url
from edge_agent.config import AgentConfig
from edge_agent.packet_limit import PacketLimit, TooLarge
from edge_agent.reconnect import CONNECTION_LOST, TAKEOVER_CAP_S, Backoff, TakeoverWatch
from modelpack.errors import AuthError, BrokerError

log = logging.getLogger(__name__)

# CONNACK codes that mean "these credentials will never work" (MQTT 5 and 3.1.1 as paho maps them).
_AUTH_FAILURES = {134, 135, 138, 140, 4, 5}
SESSION_EXPIRY_S = 3600
MQTT_MAX_PACKET = 268_435_455  # what a four-byte remaining length can say
_CLOSED = "the connection was closed, no reason given (no DISCONNECT from the broker)"


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nagle's algorithm would hold a reply behind our PUBACK until a delayed ACK: 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retained: bool = False


def packet_size(topic: str, payload: bytes | str, correlation_data: bytes | None = None) -> int:
    """An upper bound on the PUBLISH packet's size: fixed header (5), topic, packet id,
    properties (MQTT 5: their length and the correlation data) and payload."""
    body = len(payload.encode() if isinstance(payload, str) else payload)
    extra = 4 + 3 + len(correlation_data) if correlation_data is not None else 4
    return 5 + 2 + len(topic.encode(errors="replace")) + 2 + extra + body


def certificate_problem(cert_file: Path) -> str:
    """Why a broker that takes our CA may drop us before CONNACK: our certificate."""
    import datetime as dt

    from cloud_sync.fleet_ca import load_cert
    from modelpack.errors import ConfigError

    try:
        cert = load_cert(cert_file.read_bytes())
    except (OSError, ConfigError) as exc:
        return f"the client certificate {cert_file} cannot be read: {exc}"
    serial, until = format(cert.serial_number, "x"), cert.not_valid_after_utc
    when = until.isoformat(timespec="seconds")
    if until <= dt.datetime.now(dt.UTC):
        return (
            f"the device certificate {serial} expired at {when}: enroll again with a new "
            "claim token (--enroll TOKEN)"
        )
    return (
        f"the broker dropped the connection before accepting it: the device certificate "
        f"{serial} (valid until {when}) may be revoked"
    )


class Session:
    """A context-managed MQTT connection with a last will and locally tracked subscriptions."""

    def __init__(
        self,
        config: AgentConfig,
        will: tuple[str, bytes],
        on_message: Callable[[Incoming], None],
        on_connect: Callable[[bool], None] | None = None,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.v5 = config.protocol == "5"
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._on_fatal_cb = on_fatal  # ``fatal`` was set: whoever waits on the session stops
        self._subscriptions: dict[str, int] = {}
        # Topic filters whose messages go to their own handler (the identity's renewal answers).
        self._routes: list[tuple[str, Callable[[Incoming], None]]] = []
        self._tls: ssl.SSLContext | None = None
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
        self.max_packet = config.max_packet_bytes or MQTT_MAX_PACKET  # the broker's, once known
        self.client = self._make_client(will)
        self.limit = PacketLimit(self.client)
        self.client.on_publish = lambda client, userdata, mid, *rest: self.limit.acked(mid)

    def _make_client(self, will: tuple[str, bytes]) -> mqtt.Client:
        cfg, client_id = self.config, self.client_id
        if self.v5:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
                manual_ack=True,
            )
        else:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=False,
                protocol=mqtt.MQTTv311,
                reconnect_on_failure=False,
                manual_ack=True,
            )
        client.will_set(will[0], will[1], qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            # Our own context, kept: a certificate rotation loads the new chain into it.
            self._tls = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.cert_file:
                self._tls.load_cert_chain(
                    str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None
                )
            client.tls_set_context(self._tls)
        client.max_inflight_messages_set(100)
        client.on_socket_open = _no_delay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        return client

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # --- subscriptions and publishing ---------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscriptions[topic] = qos
        if self.connected:
            self.client.subscribe(topic, qos)

    def route(self, topic_filter: str, handler: Callable[[Incoming], None]) -> None:
        """Messages on ``topic_filter`` go to ``handler``, not to the agent's dispatcher."""
        self._routes.append((topic_filter, handler))
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
    ) -> mqtt.MQTTMessageInfo:
        """Raises BrokerError, sending nothing, for what the broker would drop us for.
        ``on_too_large`` is told why if the broker drops us for it all the same (MQTT 3.1.1: a
        limit it cannot say), when it is taken out of paho's queue, never to be sent again."""
        refused = self.refusal(topic, payload, correlation_data)
        if refused is not None:
            raise BrokerError(f"not published: {refused}")
        properties = None
        if self.v5 and correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        size = packet_size(topic, payload, correlation_data)
        return self.limit.publish(topic, payload, qos, retain, properties, size, on_too_large)

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
        self.limit.connected(time.monotonic())  # before ``bound`` is read: it may lapse
        told = getattr(props, "MaximumPacketSize", None) if props is not None else None
        learned = self.limit.bound or MQTT_MAX_PACKET  # from a broker that dropped us for one
        own = min(self.config.max_packet_bytes or MQTT_MAX_PACKET, learned)
        self.max_packet = min(own, told) if isinstance(told, int) else own
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
        self.max_packet = min(self.max_packet, self.limit.bound or MQTT_MAX_PACKET)
        self._lost.set()
        if not self._accepted and self.config.cert_file and not self._told_refusal:
            # TLS 1.3 reports a refused client certificate after the handshake, as a
            # dropped connection: say what is likely wrong, once per streak.
            self._told_refusal = True
            log.error("%s", certificate_problem(self.config.cert_file))

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Acknowledged first: the PUBACK leaves before anything the handling publishes, so the
        # broker has it even when a reply makes it drop us, and a message that crashes the agent
        # is not delivered again at every start. Handling is at most once: a command's effect is
        # bound to its id, and a client that lost an answer asks again.
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
            (h for f, h in self._routes if mqtt.topic_matches_sub(f, msg.topic)),
            self._on_message_cb,
        )
        try:
            handler(incoming)
        except Exception:  # a bug in one handler must not take the network loop down
            log.exception("handling a message on %s failed", msg.topic)

    # --- the connection loop -------------------------------------------------------------------

    def _connect_once(self) -> bool:
        cfg = self.config
        self._accepted = False
        try:
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                self.client.connect(
                    cfg.broker_host,
                    cfg.broker_port,
                    cfg.keepalive,
                    clean_start=False,
                    properties=props,
                )
            else:
                self.client.connect(cfg.broker_host, cfg.broker_port, cfg.keepalive)
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot reach broker %s: %s", redact_url(cfg.broker), exc)
            self.takeover.unreachable()
            self.limit.explained()
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._connect_once():
                self._lost.clear()
                self.client.loop_start()
                while not self._stop.is_set() and not self._lost.wait(0.5):
                    pass
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
        """Publish ``last_words`` (retained) if connected, then disconnect cleanly."""
        if last_words is not None and self.connected:
            with contextlib.suppress(RuntimeError, ValueError, BrokerError):  # never stops a stop
                self.publish(last_words[0], last_words[1], qos=1, retain=True).wait_for_publish(2)
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
