"""The cloud side's MQTT connection: a paho-mqtt 2.x MQTT 5 client from a broker URL.

``mqtt://[user:pass@]host[:1883]`` or ``mqtts://...[:8883]``. paho's own loop thread reconnects
with its capped exponential backoff (``reconnect_delay_set``); a broker that rejects the
credentials raises ``AuthError`` instead of being retried.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from cloud_sync.redact import redact_url, remember_password
from modelpack.errors import AuthError, BrokerError, ConfigError

log = logging.getLogger(__name__)
_AUTH_FAILURES = {134, 135, 138, 140}
SUBACK_TIMEOUT_S = 30.0  # for the broker to confirm the subscriptions, once it accepted us


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    try:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    except ValueError as exc:
        raise ConfigError(f"broker URL {redact_url(url)!r} is not a URL: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {redact_url(url)!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {redact_url(url)!r} names no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {redact_url(url)!r} has a bad port") from exc
    if parts.password:
        remember_password(parts.password)  # as written in the URL, and as sent
        remember_password(unquote(parts.password))
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def env_tls_context() -> ssl.SSLContext:
    """TLS for the cloud's commands (sync, rollout, fleet status): the CA bundle and client
    certificate of ``EDGEBENTO_MQTT_CA_FILE``, ``EDGEBENTO_MQTT_CERT_FILE`` and
    ``EDGEBENTO_MQTT_KEY_FILE`` when set (a fleet with its own CA, docs/fleet-identity.md),
    else the system's trust store."""
    import os

    ca = os.environ.get("EDGEBENTO_MQTT_CA_FILE") or None
    ctx = ssl.create_default_context(cafile=ca)
    cert = os.environ.get("EDGEBENTO_MQTT_CERT_FILE")
    if cert:
        try:
            ctx.load_cert_chain(cert, os.environ.get("EDGEBENTO_MQTT_KEY_FILE") or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"EDGEBENTO_MQTT_CERT_FILE {cert}: {exc}") from exc
    return ctx


def _guarded(callback: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """Every consumer's on_message, so that no message can end paho's network thread (paho 2
    re-raises an exception from a callback, and the client then receives nothing more)."""

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            callback(client, userdata, msg)
        except Exception:
            log.exception(
                "a message on %r could not be handled; ignored", getattr(msg, "topic", "?")
            )

    return on_message


class CloudClient:
    """A connected MQTT 5 client whose loop runs in paho's own thread.

    ``on_connect(session_present)`` runs after every (re)connect, so callers can subscribe
    again when the broker kept no session for them: with ``subscribe``, whose SUBACK sets
    ``subscribed`` (connected is not subscribed: what is published before the broker has the
    subscriptions never reaches us) and ``wait_subscribed`` waits for.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        client_id: str | None = None,
        manual_ack: bool = False,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        receive_maximum: int | None = None,
        on_message: Callable[[Any, Any, Any], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.address = parse_broker_url(broker_url)
        self.url = redact_url(broker_url)  # what errors and logs show: never the password
        self.client_id = client_id or f"edgebento-cloud-{uuid.uuid4().hex[:10]}"
        self._clean_start = clean_start
        self._props = Properties(PacketTypes.CONNECT)
        if session_expiry_s:
            self._props.SessionExpiryInterval = session_expiry_s
        if receive_maximum:
            self._props.ReceiveMaximum = receive_maximum
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        if self.address.username:
            self.client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            # A fleet's own CA and a client certificate (mTLS), or the system's trust store.
            self.client.tls_set_context(tls_context or env_tls_context())
        # Come back quickly: Mosquitto 2.0 does not restore shared subscriptions from its
        # persistence file, so what the fleet publishes between a broker restart and our
        # resubscription reaches nobody in the share.
        self.client.reconnect_delay_set(min_delay=0.25, max_delay=8)  # type: ignore[arg-type]
        if log.isEnabledFor(logging.DEBUG):
            self.client.enable_logger(log)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed a connect's subscriptions
        self.fatal: BrokerError | ConfigError | None = None
        self._started = False
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics
        self._subscribe_lock = threading.Lock()  # a SUBACK must find the mid it answers
        self._user_on_connect = on_connect
        self._user_on_disconnect = on_disconnect
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        if on_message is not None:
            self.client.on_message = _guarded(on_message)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            if reason.value in _AUTH_FAILURES:
                self.fatal = AuthError(f"{self.url} rejected the credentials: {reason}")
                self.client.disconnect()
            return
        with self._subscribe_lock:
            self._subscribing.clear()  # the last connection's SUBSCRIBEs get no SUBACK now
        self.connected.set()
        if self._user_on_connect is not None:
            try:
                self._user_on_connect(bool(flags.session_present))
            except Exception:  # paho 2 ends its network thread on an exception in a callback
                log.exception("on_connect of %s failed", self.url)

    def subscribe(self, topics: Sequence[tuple[str, int]]) -> None:
        """Subscribe to ``(topic, qos)`` pairs in one SUBSCRIBE (from ``on_connect``, on every
        connect); its SUBACK sets ``subscribed``. A topic the broker refuses (its ACL) is a
        configuration error: logged, and ``fatal``, which ``wait_subscribed`` raises."""
        with self._subscribe_lock:
            _, mid = self.client.subscribe(list(topics))
            if mid is not None:  # None: the connection dropped; the next connect subscribes
                self._subscribing[mid] = [topic for topic, _ in topics]

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        with self._subscribe_lock:
            topics = self._subscribing.pop(mid, None)
        if topics is None:
            return
        refused = [
            f"{topic} ({reason})"
            for topic, reason in zip(topics, reasons, strict=False)
            if getattr(reason, "is_failure", False)
        ]
        if refused:
            self.fatal = ConfigError(
                f"the broker at {self.url} refused {self.client_id!r} the subscription to "
                f"{', '.join(refused)}: its ACL must allow this identity to read them"
            )
            log.error("%s", self.fatal)
        self.subscribed.set()  # refused or not: whoever waits must not wait for ever

    def wait_subscribed(self, timeout: float = SUBACK_TIMEOUT_S) -> None:
        """Until the broker confirmed the subscriptions of the first connect (a reconnect's are
        not waited for); stop and raise BrokerError after ``timeout`` s, ConfigError when it
        refused one."""
        if not self.subscribed.wait(timeout):
            self.stop()
            raise BrokerError(
                f"the broker at {self.url} did not confirm our subscriptions within {timeout:g}s"
            )
        if isinstance(self.fatal, ConfigError):
            self.stop()
            raise self.fatal

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        if self._user_on_disconnect is not None:
            self._user_on_disconnect()

    def start(self, timeout: float = 10.0, keep_trying: bool = False) -> CloudClient:
        """Connect; raise BrokerError after ``timeout`` s. With ``keep_trying`` (a daemon such
        as ``edgebento sync``) return at once and let paho try, with its backoff, until the
        broker is up: a process started while its broker is down must not exit for it. A
        second start is a no-op (a second connect would replace the first)."""
        if self._started:
            return self
        self._started = True
        self.subscribed.clear()
        self.fatal = None
        if keep_trying:
            self.client.connect_async(
                self.address.host,
                self.address.port,
                keepalive=15,
                clean_start=self._clean_start,
                properties=self._props,
            )
            self.client.loop_start()
            return self
        try:
            self.client.connect(
                self.address.host,
                self.address.port,
                keepalive=15,
                clean_start=self._clean_start,
                properties=self._props,
            )
        except (OSError, ValueError) as exc:
            self._started = False
            raise BrokerError(f"cannot reach the broker at {self.url}: {exc}") from exc
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            if self.fatal is not None:
                raise self.fatal
            raise BrokerError(f"the broker at {self.url} did not accept us within {timeout:.0f}s")
        return self

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout=10)
        except (RuntimeError, ValueError) as exc:
            raise BrokerError(f"publishing to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise BrokerError(f"the broker at {self.url} did not acknowledge {topic} in 10s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._started = False

    def __enter__(self) -> CloudClient:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
