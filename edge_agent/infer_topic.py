"""Requests on ``{prefix}/{device}/infer``: from the MQTT payload to the reply to send.

A request is tensor JSON (``{"id", "inputs": {...}, "reply_to", "expires_at", "timeout_ms"}``)
or the Open Inference Protocol (``{"id", "inputs": [...], "outputs", "parameters"}``, with
``reply_to`` beside them or in ``parameters``). OIP requests are answered in OIP's form, faults
included (``{"id", "error", "reason"}`` with the ``ok: false`` every MQTT reply carries); tensor
JSON in the tensor-JSON envelope (``schema_version``, ``id``, ``ok``).

In order, each before any later work: a payload over ``max_payload_bytes`` is refused unparsed
(``too_large``); one that waited in the queue past its deadline, unparsed (``busy``, cause
``deadline``); one whose reply topic the broker would refuse (``reply_topic``) is not run and
answered nowhere; an OIP ``id`` is a string of at most 128 characters, like every request's;
``timeout_ms`` is a number of ms above 0 and at most a day (0: none), as OIP's ``timeout``,
else ``invalid``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import InferRequest
from edge_agent.inference import InferenceService
from modelpack.codec import parse_body
from modelpack.errors import EdgebentoError, InputError, OverloadError
from modelpack.serving.core import checked_timeout
from modelpack.serving.limits import ServingLimits
from modelpack.serving.oip import client_timeout_s
from modelpack.serving.reasons import error_doc

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128  # as ``Request.id``
# Why a reply topic cannot be used, or None (``Dispatcher.reply_problem``).
ReplyCheck = Callable[[str | None], "str | None"]


@dataclass(frozen=True)
class MqttReply:
    reply_to: str | None
    body: dict[str, Any] | None  # None: nothing to send; else for ``codec.dumps``
    event: dict[str, Any] | None = None  # for the telemetry outbox


@dataclass(frozen=True)
class _Envelope:
    """What is read of a request before it is validated: where its answer goes, and in which
    form."""

    request_id: str | None
    reply_to: str | None
    oip: bool


def _envelope(doc: Any) -> _Envelope:
    raw = doc if isinstance(doc, dict) else {}
    oip = isinstance(raw.get("inputs"), list)
    params = raw.get("parameters") if oip else None
    reply_to = raw.get("reply_to")
    if reply_to is None and isinstance(params, dict):
        reply_to = params.get("reply_to")
    request_id = raw.get("id")
    fits = isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS
    return _Envelope(
        request_id if fits else None, reply_to if isinstance(reply_to, str) else None, oip
    )


def failure(request_id: str | None, exc: BaseException, oip_form: bool) -> dict[str, Any]:
    doc = error_doc(exc)
    if isinstance(exc, OverloadError):
        doc.update(reason="busy", cause=exc.reason)
    if oip_form:  # OIP's {"error"}, with the ok: false every MQTT reply carries
        doc["ok"] = False
        return {"id": request_id, **doc} if request_id is not None else doc
    return {"schema_version": 1, "id": request_id or "", "ok": False, **doc}


class InferTopic:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        # The core's limits with the MQTT payload cap, made again only when either changes.
        self._parse_limits: tuple[ServingLimits, int, ServingLimits] | None = None

    def _limits(self, max_payload: int) -> ServingLimits:
        limits, cached = self.service.core.limits, self._parse_limits
        if cached is None or cached[0] is not limits or cached[1] != max_payload:
            cached = (limits, max_payload, replace(limits, max_body_bytes=max_payload))
            self._parse_limits = cached
        return cached[2]

    def handle(
        self,
        payload: bytes,
        max_payload: int,
        arrived: float,
        full: bool,
        reply_check: ReplyCheck,
    ) -> MqttReply:
        """An MQTT inference request to its reply (never raises)."""
        doc: Any = None
        try:
            refused = self._unread(payload, max_payload, arrived, full, reply_check)
            if refused is not None:
                return refused
            doc = parse_body(payload, self._limits(max_payload))
        except InputError as exc:
            self.service.core.count_error(exc)
            what = "the payload is not JSON" if exc.reason == "invalid_json" else str(exc)
            error = InputError(f"not a request: {what}", exc.reason)
            event = {"event": "bad_request", "error": str(error)}
            return MqttReply(None, failure(None, error, False), event)
        envelope = _envelope(doc)
        try:
            problem = reply_check(envelope.reply_to)
            if problem is not None:
                return self._unanswerable(envelope, problem)
            if envelope.oip:
                return self._oip(doc, envelope, arrived)
            return self._tensor(doc, envelope, arrived)
        except Exception as exc:  # a fault of ours: still a reply, and the worker lives on
            log.error("inference request failed: %s", exc, exc_info=exc)
            self.service.core.count_error(exc)
            return MqttReply(envelope.reply_to, failure(envelope.request_id, exc, envelope.oip))

    def _unread(
        self, payload: bytes, max_payload: int, arrived: float, full: bool, reply_check: ReplyCheck
    ) -> MqttReply | None:
        """The refusals decided before the payload is parsed: its size, the queue, the wait."""
        service = self.service
        if len(payload) > max_payload:
            exc = InputError(
                f"the request is {len(payload)} bytes; the cap is {max_payload}", reason="too_large"
            )
            service.core.count_error(exc)
            return MqttReply(
                None, failure(None, exc, False), {"event": "bad_request", "error": str(exc)}
            )
        late = service.busy() if full else service.late(arrived)
        if late is None:
            return None
        # Its reply_to is in the payload: read only when it is small enough to read at once.
        envelope = _envelope(_small_json(payload))
        problem = reply_check(envelope.reply_to)
        if problem is not None:
            return self._unanswerable(envelope, problem)
        return MqttReply(envelope.reply_to, failure(envelope.request_id, late, envelope.oip))

    def _unanswerable(self, envelope: _Envelope, problem: str) -> MqttReply:
        exc = InputError(f"the reply topic cannot be used: {problem}", reason="reply_topic")
        self.service.core.count_error(exc)
        event = {"event": "unanswered", "reason": "reply_topic", "id": envelope.request_id,
                 "error": str(exc)}  # fmt: skip
        return MqttReply(None, None, event)

    def _oip(self, doc: dict[str, Any], envelope: _Envelope, arrived: float) -> MqttReply:
        request_id = doc.get("id")
        if request_id is not None and envelope.request_id is None:
            error = InputError(
                f"id must be a string of at most {MAX_ID_CHARS} characters", reason="invalid"
            )
            self.service.core.count_error(error)
            body = failure(None, error, True)
            return MqttReply(envelope.reply_to, body, {"event": "bad_request", "error": str(error)})
        try:
            # OIP's answer, with the ok every MQTT reply carries (an extra field to OIP clients).
            answer = self.service.run(doc, arrived=arrived)
        except EdgebentoError as exc:
            return MqttReply(envelope.reply_to, failure(envelope.request_id, exc, True))
        return MqttReply(envelope.reply_to, {**answer.doc, "ok": True})

    def _tensor(self, doc: Any, envelope: _Envelope, arrived: float) -> MqttReply:
        try:
            request = InferRequest.model_validate(doc)
        except ValidationError as exc:
            error = InputError(f"not a request: {exc.errors()[0]['msg']}", reason="invalid")
            self.service.core.count_error(error)
            body = failure(envelope.request_id, error, False)
            return MqttReply(envelope.reply_to, body, {"event": "bad_request", "error": str(error)})
        if request.expired():
            error_text = f"infer {request.id} expired at {request.expires_at}; dropped"
            body = {"schema_version": 1, "id": request.id, "ok": False, "error": error_text}
            body.update(expired=True, reason="expired")
            return MqttReply(request.reply_to, body, {"event": "expired", "id": request.id})
        # The request's own fields, read from the document it validated (``request.body()``
        # would copy every input number once more).
        try:
            timeout_s = client_timeout_s(doc.get("timeout_ms"), "timeout_ms", 1000)
            if timeout_s is not None:  # as OIP's timeout: positive, at most a day
                timeout_s = checked_timeout(timeout_s, "timeout_ms")
        except InputError as exc:  # 1 followed by 400 zeros, a string, a negative number
            self.service.core.count_error(exc)
            body = failure(request.id, exc, False)
            return MqttReply(request.reply_to, body, {"event": "bad_request", "error": str(exc)})
        try:
            answer = self.service.run({"inputs": doc.get("inputs")}, timeout_s, arrived)
        except EdgebentoError as exc:
            return MqttReply(request.reply_to, failure(request.id, exc, False))
        body = {"schema_version": 1, "id": request.id, "ok": True, **answer.doc}
        return MqttReply(request.reply_to, body)


SMALL_JSON = 64 << 10


def _small_json(payload: bytes) -> Any:
    """The payload as JSON when it is small and valid, else None (for a refusal's address)."""
    if len(payload) > SMALL_JSON:
        return None
    try:
        return parse_body(payload, SMALL_JSON)
    except InputError:
        return None
