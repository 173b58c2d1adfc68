"""Enrollment by claim and renewal over MQTT: the topics, the messages and the service.

Import path and API::

    from cloud_sync.enroll import EnrollmentService, EnrollRequest, EnrollReply, enroll_topic
    service = EnrollmentService(ca, IdentityStore(store), days=90)
    reply = service.handle("cam-1", "claim", payload)     # an EnrollReply, never an exception
    service.serve(broker_url, tls_context, prefix)        # until stop()
    service.wait_serving(30)                              # the broker has its subscriptions

Topics (``{prefix}/enroll/{device}/...``; the device id comes from the topic, which the broker's
ACL ties to the connection, never from the payload):

- ``claim``: a CSR and a claim token; only the shared ``claim`` identity may publish here.
- ``renew``: a CSR, sent by the device over its current certificate (ACL ``%u``).
- ``rotated``: the device says it runs on its new certificate: only now does the old one go
  into the CRL (``cloud_sync.identity_rotation``: a renewal whose answer was lost leaves the
  device on its old certificate, which must keep working).
- ``response``: the service's answer, ``{"id", "ok", "reason", "certificate", "chain"}``.

Every refusal has a reason and is counted (``refusals``): a reused token, a token for another
device, a CSR for another subject, a revoked device, too many requests, a device past its
renewal budget (``renewal_budget``, with ``retry_after_s``: ``cloud_sync.renewal_budget``, kept
in its record in the store, so that a stolen key cannot grow the CRL without bound).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud_sync.fleet_ca import DEVICE_DAYS, FleetCA, cert_pem
from cloud_sync.identity_store import ClaimRefused, IdentityStore, token_hash
from cloud_sync.renewal_budget import RenewalBudget, budget_from_env
from cloud_sync.reserved_ids import RESERVED_IDS
from cloud_sync.rollout_state import DEVICE_ID
from modelpack.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("claim", "renew", "rotated")
MAX_REQUEST_BYTES = 16 << 10  # a P-256 CSR is ~500 bytes; RSA-4096 ~1.7 KB


def enroll_topic(prefix: str, device: str, kind: str) -> str:
    return f"{prefix}/enroll/{device}/{kind}"


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str = Field(min_length=1, max_length=64)
    csr: str | None = Field(default=None, max_length=8192)
    token: str | None = Field(default=None, max_length=256)
    serial: str | None = Field(default=None, max_length=64)  # rotated: the certificate now used


class EnrollReply(BaseModel):
    schema_version: int = SCHEMA_VERSION
    id: str
    ok: bool
    reason: str | None = None
    error: str | None = None
    certificate: str | None = None
    chain: str | None = None
    retry_after_s: float | None = None  # renewal_budget: when one is free again

    @field_validator("retry_after_s", mode="before")
    @classmethod
    def _a_number_or_none(cls, value: object) -> object:
        """A JSON number, else None: ``true`` or ``"60"`` are no wait (pydantic's lax mode made
        them 1.0 and 60.0), and one that does not validate (``[1]``) must not throw away the
        whole answer, an ``ok`` one's certificate (the budget already paid for) included."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        try:
            return float(value)
        except OverflowError:  # an integer of 400 digits
            return None


class RateLimit:
    """A token bucket for the whole service and a minimum gap per device (per device and token
    for claims): a flood of claims (valid tokens or not) costs the CA at most ``rate``
    signatures a second."""

    def __init__(self, rate: float = 200.0, burst: int = 400, per_device_s: float = 1.0) -> None:
        self.rate, self.burst, self.per_device_s = rate, burst, per_device_s
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, device: str) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if now - self._last.get(device, -1e9) < self.per_device_s or self._tokens < 1:
                return False
            self._tokens -= 1
            self._last[device] = now
            if len(self._last) > 100_000:  # forget the oldest gaps rather than grow for ever
                self._last = dict(sorted(self._last.items(), key=lambda kv: kv[1])[-50_000:])
            return True


class EnrollmentService:
    def __init__(
        self,
        ca: FleetCA,
        ids: IdentityStore,
        days: float = DEVICE_DAYS,
        limit: RateLimit | None = None,
        on_retired: Callable[[], None] | None = None,
        budget: RenewalBudget | None = None,
    ) -> None:
        # Claims are checked against this CA's signature, whatever store object was given.
        ids = ids if ids.ca is not None else IdentityStore(ids.store, ca)
        self.ca, self.ids, self.days = ca, ids, days
        self.limit = limit or RateLimit()
        self.budget = budget or budget_from_env()  # renewals per device, kept in the store
        self.on_retired = on_retired  # rewrite the CRL and reload the broker
        self.enrolled: Counter[str] = Counter()  # by kind
        self.refusals: Counter[str] = Counter()  # by reason
        self._client: Any = None
        self._serving = False
        self.online: dict[str, bool] = {}  # from the retained statuses: revoked-but-connected

    def _refuse(
        self, request_id: str, reason: str, error: str, retry_after_s: float | None = None
    ) -> EnrollReply:
        self.refusals[reason] += 1
        log.warning("enrollment refused (%s): %s", reason, error)
        return EnrollReply(
            id=request_id, ok=False, reason=reason, error=error, retry_after_s=retry_after_s
        )

    def handle(self, device: str, kind: str, payload: bytes) -> EnrollReply:
        if len(payload) > MAX_REQUEST_BYTES:
            return self._refuse("?", "bad_request", f"the request is over {MAX_REQUEST_BYTES} B")
        try:
            request = EnrollRequest.model_validate_json(payload)
        except ValidationError as exc:
            return self._refuse(
                "?", "bad_request", f"not an enrollment request: {exc.errors()[0]['msg']}"
            )
        if not DEVICE_ID.fullmatch(device) or kind not in KINDS:
            return self._refuse(request.id, "bad_request", f"no enrollment topic for {device!r}")
        if device in RESERVED_IDS:  # cloud identities may publish on its topics (reserved_ids)
            return self._refuse(request.id, "bad_request", f"device id {device!r} is reserved")
        # A claim's gap is per token: anyone with the shared claim certificate may publish on
        # every device's claim topic, and junk without the token must not lock the device out.
        # ``rotated`` has its own gap: it follows its renewal within the second, and a renewal
        # and its confirmation must not compete (a flood of ``rotated`` is still limited).
        if kind == "claim" and request.token:
            gap = f"{device}:{token_hash(request.token)}"
        else:
            gap = f"{device}:rotated" if kind == "rotated" else device
        if not self.limit.allow(gap):
            return self._refuse(request.id, "rate_limited", "too many requests: try again later")
        try:
            if kind == "rotated":
                return self._rotated(device, request)
            spent = None
            if kind == "claim":
                if not request.token:
                    raise ClaimRefused("bad_request", "a claim needs a token")
                self._check_csr(device, request)
                spent = self.ids.consume_claim(request.token, device)
            else:
                self.ids.check_may_renew(device, self.budget, request.id)
            cert = self._sign(device, request)
            via = "claim" if spent else "renew"
            self.ids.record_issue(device, cert, via, spent, self.budget, request.id)
        except ClaimRefused as exc:
            return self._refuse(request.id, exc.reason, str(exc), exc.retry_after_s)
        self.enrolled[kind] += 1
        log.info("%s: certificate %x issued (%s)", device, cert.serial_number, kind)
        pem = cert_pem(cert).decode()
        return EnrollReply(id=request.id, ok=True, certificate=pem, chain=self.ca.chain.decode())

    def _check_csr(self, device: str, request: EnrollRequest) -> None:
        """Before the token is spent: a CSR for another subject must not burn a good token."""
        self._sign(device, request, dry=True)

    def _sign(self, device: str, request: EnrollRequest, dry: bool = False) -> Any:
        if not request.csr:
            raise ClaimRefused("bad_request", "the request carries no CSR")
        try:
            if dry:
                self.ca.check_device_csr(request.csr.encode(), device)
                return None
            return self.ca.sign_device_csr(request.csr.encode(), device, self.days)
        except ConfigError as exc:
            raise ClaimRefused("bad_csr", str(exc)) from exc

    def _rotated(self, device: str, request: EnrollRequest) -> EnrollReply:
        doc = self.ids.acting_on(device)
        if doc is None or doc.revoked:
            raise ClaimRefused("revoked" if doc else "not_enrolled", f"{device} may not rotate")
        doc = self.ids.confirm_rotation(device, request.serial)  # ClaimRefused: bad_request
        if self.on_retired is not None and self.ids.unlisted(doc):
            self.on_retired()  # the replaced certificates go into the CRL now
        return EnrollReply(id=request.id, ok=True)

    # --- over MQTT ------------------------------------------------------------------------------

    def serve(self, broker_url: str, tls_context: Any, prefix: str = "edgebento") -> None:
        """Connect in the background (a broker that is down is waited for) and answer until
        ``stop``; ``wait_serving`` says when requests can no longer be missed. Serving again
        before ``stop`` is a no-op."""
        from cloud_sync.mqtt import CloudClient

        if self._client is not None and self._serving:
            return
        levels = len(prefix.split("/"))

        def on_message(client: Any, _u: Any, msg: Any) -> None:
            parts = msg.topic.split("/")
            if len(parts) == levels + 2 and parts[-1] == "status":
                self._on_status(parts[-2], bytes(msg.payload))
                return
            if len(parts) != levels + 3:
                return
            device, kind = parts[-2], parts[-1]
            try:
                reply = self.handle(device, kind, bytes(msg.payload))
            except ClaimRefused as exc:
                reply = self._refuse("?", exc.reason, str(exc))
            except Exception as exc:  # the service answers and goes on
                log.exception("enrollment of %s failed", device)
                reply = self._refuse("?", "internal", type(exc).__name__)
            client.publish(
                enroll_topic(prefix, device, "response"),
                reply.model_dump_json(exclude_none=True),
                1,
            )

        def on_connect(_present: bool) -> None:
            topics = [(enroll_topic(prefix, "+", kind), 1) for kind in KINDS]
            self._client.subscribe([*topics, (f"{prefix}/+/status", 1)])

        self._client = CloudClient(
            broker_url,
            client_id="enroll",
            on_message=on_message,
            on_connect=on_connect,
            tls_context=tls_context,
        )
        self._client.start(keep_trying=True)
        self._serving = True

    def wait_serving(self, timeout: float) -> None:
        """Until the broker confirmed the service's subscriptions: a claim a device sends once
        is answered from then on (connected is not enough: before the SUBACK it is lost).
        BrokerError after ``timeout`` s; ConfigError when the broker refused one (its ACL)."""
        if self._client is None:
            raise ConfigError("the enrollment service is not serving")
        self._client.wait_subscribed(timeout)

    def _on_status(self, device: str, payload: bytes) -> None:
        from cloud_sync.protocol import Status

        try:
            status = Status.model_validate_json(payload)
        except ValidationError:
            self.online.pop(device, None)  # an emptied retained status: gone
            return
        if status.device == device:  # identity from the topic, never the payload
            self.online[device] = status.state == "online"

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
        self._serving = False

    @property
    def fatal(self) -> Exception | None:
        """What stops the service for good: credentials or a subscription the broker refused."""
        return self._client.fatal if self._client is not None else None

    def stats(self) -> dict[str, Any]:
        return {"enrolled": dict(self.enrolled), "refusals": dict(self.refusals)}

    def stats_json(self) -> str:
        return json.dumps(self.stats(), sort_keys=True)
