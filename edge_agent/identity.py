"""The device's identity: its own key, enrollment by claim, and renewal before expiry.

Import path and API::

    from edge_agent import identity
    config = identity.prepare_identity(config)  # before the agent starts: enroll, or refuse expired
    renewer = identity.Renewer.for_agent(config, session, record)   # None: not ours to renew

The key pair is made here, on the device, and written 0600 under ``{data_dir}/identity/``; only
the CSR leaves. Extension point for a PKCS#11 token or a TPM: ``KeyMaker`` makes a key and
signs the CSR; an implementation that keeps the key in hardware returns a key object whose
``sign`` runs there and writes a PKCS#11 URI instead of the PEM (OpenSSL's provider then loads
it for the TLS handshake). The default writes a PEM file.

The renewer sees only the narrow ``Channel`` it needs (publish, route, reconnect with another
certificate), never the agent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cloud_sync.enroll import EnrollReply, enroll_topic
from cloud_sync.fleet_ca import new_key, write_private
from edge_agent.config import AgentConfig
from edge_agent.identity_files import IdentityFiles, cert_window
from edge_agent.renewal_wait import (
    BACKOFF_MAX_S,
    NOT_NOW,
    RENEW_JITTER,
    LastWindow,
    NotServed,
    try_again_in,
    wait_until,
)
from modelpack.errors import AuthError, BrokerError, ConfigError

log = logging.getLogger(__name__)
REPLY_TIMEOUT_S = 20.0
# A claim no service answered (none subscribed yet: a device that starts before the enrollment
# service, or while it restarts) is sent again, the same request: if the first did arrive, its
# answer comes first (the service answers in order) and the repeat's token_reused is not read.
CLAIM_RESEND_S = 10.0
ENROLL_TIMEOUT_S = 120.0
ROTATED_TRIES, ROTATED_GAP_S = 4, 1.5  # the service's gap per device is 1 s by default


def _at(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")


class Channel(Protocol):
    def route(self, topic_filter: str, handler: Callable[[Any], None]) -> None: ...
    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> Any: ...
    def use_identity(self, cert_file: Path, key_file: Path) -> None: ...
    def wait_connected(self, timeout: float) -> bool: ...


class KeyMaker:
    """Makes the device's key where it is kept and a CSR signed by it (see the docstring)."""

    def new_key(self, path: Path) -> Any:
        key = new_key()
        write_private(path, key)
        return key

    def csr(self, key: Any, device: str) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)])
        request = x509.CertificateSigningRequestBuilder().subject_name(subject)
        return bytes(request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def files_of(config: AgentConfig) -> IdentityFiles:
    return IdentityFiles(config.data_dir / "identity")


def _token(config: AgentConfig) -> str | None:
    if config.enroll_token:
        return config.enroll_token.strip()
    if config.enroll_token_file is not None:
        try:
            return config.enroll_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--enroll-file {config.enroll_token_file}: {exc.strerror}") from exc
    return None


def prepare_identity(config: AgentConfig) -> AgentConfig:
    """The config the agent connects with: its own certificate, after an enrollment by claim
    when it has none (or only an expired one) and a token was given."""
    if config.cert_file is not None:
        return config  # certificates managed by the operator: not ours to enroll or renew
    files = files_of(config)
    files.finish_swap()
    token = _token(config)
    if files.cert.exists():
        _, not_after, serial = cert_window(files.cert)
        if time.time() < not_after:
            files.write_status("valid", serial=serial, not_after=not_after)
            return config.model_copy(update={"cert_file": files.cert, "key_file": files.key})
        reason = f"the device certificate {serial} expired at {_at(not_after)}"
        files.write_status("expired", serial=serial, not_after=not_after, reason=reason)
        if token is None:
            raise AuthError(f"{reason}: enroll again with a new claim token (--enroll TOKEN)")
        log.error("%s; enrolling again with the claim token given", reason)
    elif token is None:
        return config  # no identity of our own: user name and password, or none
    enroll_by_claim(config, token, files)
    return config.model_copy(update={"cert_file": files.cert, "key_file": files.key})


def _request(csr: bytes, **extra: Any) -> tuple[str, bytes]:
    request_id = uuid.uuid4().hex
    doc = {"schema_version": 1, "id": request_id, "csr": csr.decode(), **extra}
    return request_id, json.dumps(doc).encode()


def enroll_by_claim(config: AgentConfig, token: str, files: IdentityFiles) -> None:
    """Key, CSR, and the request over the claim listener; AuthError when it is refused."""
    import paho.mqtt.client as mqtt

    from cloud_sync.fleet_ca import tls_context
    from cloud_sync.mqtt import parse_broker_url

    if config.claim_cert_file is None or config.ca_file is None:
        raise ConfigError("enrollment by claim needs --claim-cert, --claim-key and --ca-file")
    address = parse_broker_url(config.claim_broker or config.broker)
    maker = KeyMaker()
    key = maker.new_key(files.next_key)
    csr = maker.csr(key, config.device)
    asked: dict[str, Any] = {}  # the request now waited for: its id and payload
    asked["id"], asked["payload"] = _request(csr, token=token)
    answer: dict[str, EnrollReply] = {}
    got = threading.Event()
    response = enroll_topic(config.prefix, config.device, "response")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            reply = EnrollReply.model_validate_json(msg.payload)
        except ValueError:
            return
        if reply.id == asked["id"]:
            answer["reply"] = reply
            got.set()

    claim_topic = enroll_topic(config.prefix, config.device, "claim")
    subscribed = threading.Event()

    def on_subscribe(client: Any, *_a: Any) -> None:
        subscribed.set()
        client.publish(claim_topic, asked["payload"], qos=1)

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"claim-{config.device}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.tls_set_context(
        tls_context(config.ca_file, config.claim_cert_file, config.claim_key_file)
    )
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_a: c.subscribe(response, 1)
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise BrokerError(
            f"cannot reach the claim listener {address.host}:{address.port}: {exc}"
        ) from exc
    client.loop_start()
    deadline = time.monotonic() + ENROLL_TIMEOUT_S
    try:
        while True:
            while not got.wait(CLAIM_RESEND_S):
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"no answer to the enrollment of {config.device} in {ENROLL_TIMEOUT_S:.0f}s"
                    )
                if subscribed.is_set():
                    log.warning("no answer to the enrollment yet; asking again")
                    client.publish(claim_topic, asked["payload"], qos=1)
            if answer["reply"].reason != "rate_limited":
                break
            # Busy, or flooded by whoever else holds the claim certificate: not a refusal (an
            # AuthError would stop the device for good). Again later, as a new request, so that
            # a late answer to the old one is not read as the answer to this one.
            if time.monotonic() >= deadline:
                raise BrokerError(f"the enrollment service stayed too busy for {config.device}")
            log.warning("the enrollment service is busy; asking again shortly")
            got.clear()
            time.sleep(random.uniform(1.0, 3.0))
            asked["id"], asked["payload"] = _request(csr, token=token)
            client.publish(claim_topic, asked["payload"], qos=1)
    finally:
        client.disconnect()
        client.loop_stop()
    reply = answer["reply"]
    if not reply.ok or not reply.certificate:
        files.next_key.unlink(missing_ok=True)
        files.write_status("refused", reason=f"{reply.reason}: {reply.error}")
        raise AuthError(f"enrollment of {config.device} refused ({reply.reason}): {reply.error}")
    try:
        files.install(reply.certificate, config.device, key.public_key())
    except AuthError as exc:
        files.next_key.unlink(missing_ok=True)
        files.write_status("refused", reason=str(exc))
        raise
    serial = cert_window(files.cert)[2]
    # A new identity: what was said of an earlier certificate no longer holds.
    files.write_status("valid", enrolled=time.time(), last_rotation=None, renew_after=None)
    log.info("enrolled %s: certificate %s", config.device, serial)


class Renewer:
    """Renews at ``renew_at`` of the certificate's life (with jitter; retried with backoff, or
    as late as the service asks: ``edge_agent.renewal_wait``):
    a new key and CSR over the current identity, the new certificate, a reconnect with it, and
    then the device says ``rotated`` so that the cloud revokes the old one."""

    def __init__(
        self,
        config: AgentConfig,
        channel: Channel,
        files: IdentityFiles,
        on_event: Callable[[str, dict[str, Any]], None],
        wait: Callable[[threading.Event, float, Callable[[], float] | None], bool] = wait_until,
    ) -> None:
        self.config, self.channel, self.files, self.on_event = config, channel, files, on_event
        self._wait, self._window = wait, LastWindow(files.cert)
        # The answer to the one request asked at a time (``_ask``): others are not kept.
        self._replies: dict[str, EnrollReply] = {}
        self._awaiting: str | None = None
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self.rotations = 0
        self.gave_up: str | None = None
        self._spread = random.random()  # where this device's clamped waits end (renewal_wait)
        channel.route(enroll_topic(config.prefix, config.device, "response"), self._on_reply)
        self._thread = threading.Thread(target=self._run, name="identity-renewer", daemon=True)

    @classmethod
    def for_agent(
        cls, config: AgentConfig, channel: Channel, record: Callable[[str, dict[str, Any]], None]
    ) -> Renewer | None:
        files = files_of(config)
        if config.cert_file != files.cert:
            return None
        renewer = cls(config, channel, files, record)
        renewer._thread.start()
        return renewer

    def _on_reply(self, message: Any) -> None:
        try:
            reply = EnrollReply.model_validate_json(message.payload)
        except ValueError:
            return
        with self._arrived:
            if reply.id != self._awaiting:
                return  # a late answer to a request given up on: nobody reads it
            first = self._replies.get(reply.id)
            if first is not None and first.ok:
                return  # a duplicate delivery's later answer (``replayed``) loses no certificate
            self._replies[reply.id] = reply
            self._arrived.notify_all()

    def _ask(self, kind: str, payload: bytes, request_id: str) -> EnrollReply | None:
        topic = enroll_topic(self.config.prefix, self.config.device, kind)
        with self._arrived:
            self._awaiting = request_id
            self._replies.clear()
        self.channel.publish(topic, payload, qos=1)
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        with self._arrived:
            try:
                while request_id not in self._replies:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop.is_set():
                        return None
                    self._arrived.wait(min(left, 0.5))
                return self._replies.pop(request_id)
            finally:
                self._awaiting = None

    def due_in(self) -> float:
        not_before, not_after, _ = self._window.read()
        life = not_after - not_before
        jitter = random.uniform(-RENEW_JITTER, RENEW_JITTER) * life  # a fleet renews spread
        return max(0.0, not_before + self.config.renew_at * life + jitter - time.time())

    def _status(self, state: str, **fields: Any) -> None:
        self.files.write_status(state, **self._window.said(fields))

    def _due(self) -> float:
        at = time.time() + self.due_in()
        # The status says when: an operator sees a renewal that is due and has not happened.
        self._status("valid", renew_after=at)
        return at

    def _run(self) -> None:
        """Renews until stopped or refused for good. Nothing else ends it (an unreadable
        certificate file, a full disk): a renewer gone while the status says ``valid`` let the
        certificate expire unseen. Waits are on the wall clock, as certificates' times are."""
        failures, at, latest = 0, None, None
        while not self._stop.is_set():
            try:
                at = self._due() if at is None else at
                if self._wait(self._stop, at, latest):
                    return
                self.renew_once()
                failures, at, latest = 0, None, None
            except AuthError as exc:  # revoked or unknown: renewing again will not help
                self.gave_up = str(exc)
                log.error("certificate renewal refused: %s", exc)
                self._status("renewal_refused", reason=str(exc))
                return
            except Exception as exc:
                failures += 1
                try:
                    at = self._after_failure(failures, exc)
                    # A wait that ends before the last stretch never reaches into it, however
                    # long the device was suspended: its start is read again at each wake.
                    latest = partial(self._window.last_stretch, self._spread)
                    latest = latest if at <= latest() else None
                except Exception:
                    log.exception("certificate renewal: trying again in %.0f s", BACKOFF_MAX_S)
                    at, latest = time.time() + BACKOFF_MAX_S, None

    def _after_failure(self, failures: int, exc: Exception) -> float:
        """When the next try comes: after the backoff, or as long as the service asked
        (``next_try_in``); said in the log and in the status (``renew_after``, ``reason``)."""
        not_before, not_after, _ = self._window.read()
        now = time.time()
        wait = try_again_in(failures, exc, now, not_before, not_after, self._spread)
        said = f"{exc}; trying again in {wait:.0f} s, at {_at(now + wait)}"
        log.warning("certificate renewal failed (try %d): %s", failures, said)
        state = "valid" if now < not_after else "expired"
        self._status(state, renew_after=now + wait, reason=f"try {failures}: {said}")
        return now + wait

    def renew_once(self) -> None:
        if not self.channel.wait_connected(REPLY_TIMEOUT_S):
            raise BrokerError("not connected")
        maker = KeyMaker()
        key = maker.new_key(self.files.next_key)
        request_id, payload = _request(maker.csr(key, self.config.device))
        reply = self._ask("renew", payload, request_id)
        if reply is None:
            raise BrokerError("no answer to the renewal")
        if not reply.ok or not reply.certificate:
            self.files.next_key.unlink(missing_ok=True)
            if reply.reason in NOT_NOW:
                raise NotServed(reply)
            raise AuthError(f"{reply.reason}: {reply.error}")
        old = self._window.serial()  # the one connected with, even if unreadable since
        self.files.install(reply.certificate, self.config.device, key.public_key())
        _, not_after, serial = self._window.read()
        self.channel.use_identity(self.files.cert, self.files.key)
        if not self.channel.wait_connected(REPLY_TIMEOUT_S):
            raise BrokerError("no connection with the new certificate")
        self._confirm(serial)
        self.rotations += 1
        self._status("valid", serial=serial, not_after=not_after, last_rotation=time.time())
        self.on_event("event", {"event": "certificate_rotated", "old": old, "new": serial})
        log.info("certificate rotated: %s -> %s (valid until %.0f)", old, serial, not_after)

    def _confirm(self, serial: str) -> None:
        """Say ``rotated`` until the service takes it: only then does it retire the old
        certificate (unanswered, or answered "not now", e.g. the rate limit's gap after the
        renewal, it would stay valid for the cloud's grace of days)."""
        for attempt in range(1, ROTATED_TRIES + 1):
            request_id = uuid.uuid4().hex
            doc = {"schema_version": 1, "id": request_id, "serial": serial}
            reply = self._ask("rotated", json.dumps(doc).encode(), request_id)
            if reply is not None and (reply.ok or reply.reason not in NOT_NOW):
                if not reply.ok:
                    log.warning("rotation to %s refused: %s", serial, reply.error)
                return
            if self._stop.wait(ROTATED_GAP_S * attempt):
                return
        log.warning("rotation to %s not confirmed: the old certificate retires later", serial)

    def stop(self) -> None:
        self._stop.set()
        with self._arrived:
            self._arrived.notify_all()
