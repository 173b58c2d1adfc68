"""Local inference: the serving core behind MQTT, the local HTTP endpoint and pipelines, the live
model swapped atomically, and the counts telemetry reports.

MQTT requests on ``{prefix}/{device}/infer`` are tensor JSON (``{"id", "inputs": {...},
"reply_to", "expires_at", "timeout_ms"}``) or the Open Inference Protocol (``{"id", "inputs":
[...], "outputs", "parameters"}``, answered in OIP form). A payload over ``max_payload_bytes`` is
refused before it is parsed; a full queue or a passed deadline is answered ``ok: false`` with
reason ``busy`` (and the ``cause``: ``queue_full`` or ``deadline``).
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from cloud_sync.protocol import InferRequest
from modelpack.codec import parse_body
from modelpack.errors import EdgebentoError, InputError, OverloadError
from modelpack.metrics import LATENCY_BUCKETS, InferenceMetrics, NoMetrics
from modelpack.predictor import Predictor
from modelpack.serving.core import ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.reasons import NotReadyError, error_doc

log = logging.getLogger(__name__)


def parse_quietly(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except Exception:
        return None


# Called with (request payload, answer) for every successful inference (capture).
Observer = Callable[[Any, dict[str, Any]], None]


class InferenceStats:
    """Counts and a latency histogram since the last snapshot (the telemetry interval)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.since = time.monotonic()
        self.ok = self.errors = 0
        self.rejected: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_seconds = 0.0

    def observe_ok(self, seconds: float) -> None:
        with self._lock:
            self.ok += 1
            self.total_seconds += seconds
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def observe_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def observe_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        with self._lock:
            snap = {
                "ok": self.ok,
                "errors": self.errors,
                "rejected": dict(self.rejected),
                "latency_buckets_s": [*LATENCY_BUCKETS, "+Inf"],
                "latency_counts": list(self.buckets),
                "mean_ms": round(1000 * self.total_seconds / self.ok, 3) if self.ok else None,
                "window_s": round(time.monotonic() - self.since, 3),
            }
            if reset:
                self._reset()
        return snap


class _Counted(NoMetrics):
    """The core's metrics, counted for telemetry too."""

    def __init__(self, inner: InferenceMetrics, stats: InferenceStats) -> None:
        super().__init__()
        self.inner, self.stats = inner, stats

    def set_model(self, name: str, version: int | str, expires_at: float | None = None) -> None:
        self.inner.set_model(name, version, expires_at)

    def ok(self, seconds: float) -> None:
        self.inner.ok(seconds)
        self.stats.observe_ok(seconds)

    def rejected_input(self, reason: str) -> None:
        self.inner.rejected_input(reason)
        self.stats.observe_rejected(reason)

    def overloaded(self, reason: str) -> None:
        self.inner.overloaded(reason)
        self.stats.observe_rejected("busy")

    def failed(self, reason: str = "internal") -> None:
        self.inner.failed(reason)
        self.stats.observe_error()

    def queue_depth(self, depth: int) -> None:
        self.inner.queue_depth(depth)

    def queue_wait(self, seconds: float) -> None:
        self.inner.queue_wait(seconds)

    def cache(self, hit: bool) -> None:
        self.inner.cache(hit)


@dataclass(frozen=True)
class MqttReply:
    reply_to: str | None
    body: dict[str, Any] | None  # None: nothing to send
    event: dict[str, Any] | None = None  # for the telemetry outbox


def _failure(request_id: str | None, exc: BaseException, oip_form: bool) -> dict[str, Any]:
    doc = error_doc(exc)
    if isinstance(exc, OverloadError):
        doc.update(reason="busy", cause=exc.reason)
    if oip_form:  # OIP's {"error"}, with the ok: false every MQTT reply carries
        doc["ok"] = False
        return {"id": request_id, **doc} if request_id is not None else doc
    return {"schema_version": 1, "id": request_id or "", "ok": False, **doc}


class InferenceService:
    """Runs requests on whatever model is live; a swap never fails a request in flight.

    A request takes one reference to the model when it starts and keeps it to the end, so
    swapping only changes what the next request sees; the old session is freed with its last user.
    """

    def __init__(
        self,
        metrics: InferenceMetrics | None = None,
        limits: ServingLimits | None = None,
        running: int = 1,
    ) -> None:
        self.stats = InferenceStats()
        self.core = ServingCore(
            limits or ServingLimits(max_rows=256, max_queue=64),
            _Counted(metrics or NoMetrics(), self.stats),
            batching=False,
            running=running,
        )
        self.observers: list[Observer] = self.core.observers
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self.core.limits.max_rows

    @max_batch.setter
    def max_batch(self, rows: int) -> None:
        self.core.limits = replace(self.core.limits, max_rows=rows)

    @property
    def predictor(self) -> Predictor | None:
        model = self.core.model
        return None if model is None else model.predictor

    def swap(
        self, predictor: Predictor, samples: Mapping[str, np.ndarray] | None = None
    ) -> Predictor | None:
        """``samples``: the pack's golden inputs, a known-good input for telling a client's
        input the model cannot run (400) from a broken model (an error)."""
        old = self.predictor
        self.core.serve(predictor, samples=samples)
        return old

    @property
    def model_ref(self) -> dict[str, Any] | None:
        predictor = self.predictor
        return None if predictor is None else dict(predictor.model_ref)

    def infer(
        self, payload: Any, timeout_s: float | None = None, arrived: float | None = None
    ) -> dict[str, Any]:
        """A parsed request (tensor JSON or OIP) in, its answer out; raises EdgebentoError."""
        if self.core.model is None:
            exc = NotReadyError("no model is installed on this device yet")
            self.core.count_error(exc)
            raise exc
        return self.core.infer_doc(payload, timeout_s, arrived)

    # --- MQTT ----------------------------------------------------------------------------------

    def submit(
        self, pool: Executor, handle: Callable[[Any, float, bool], None], msg: Any, arrived: float
    ) -> None:
        """Hand a message to the worker pool, or (queue full) straight back to be refused."""
        with self._lock:
            full = self._pending >= self.core.limits.max_queue
            if not full:
                self._pending += 1
        if full:
            handle(msg, arrived, True)
            return

        def run() -> None:
            try:
                handle(msg, arrived, False)
            finally:
                with self._lock:
                    self._pending -= 1

        pool.submit(run)

    def handle_message(
        self, payload: bytes, max_payload: int, arrived: float | None = None, full: bool = False
    ) -> MqttReply:
        """An MQTT inference request to its reply (never raises)."""
        arrived = time.monotonic() if arrived is None else arrived
        try:
            return self._message(payload, max_payload, arrived, full)
        except Exception as exc:  # a fault of ours: still a reply, and the worker lives on
            log.error("inference request failed: %s", exc, exc_info=exc)
            self.core.count_error(exc)
            doc = parse_quietly(payload)
            reply_to = doc.get("reply_to") if isinstance(doc, dict) else None
            request_id = doc.get("id") if isinstance(doc, dict) else None
            body = {
                "schema_version": 1,
                "id": request_id if isinstance(request_id, str) else "",
                "ok": False,
                **error_doc(exc),
            }
            return MqttReply(reply_to if isinstance(reply_to, str) else None, body)

    def _message(self, payload: bytes, max_payload: int, arrived: float, full: bool) -> MqttReply:
        if len(payload) > max_payload:
            exc = InputError(
                f"the request is {len(payload)} bytes; the cap is {max_payload}", reason="too_large"
            )
            self.core.count_error(exc)
            event = {"event": "bad_request", "error": str(exc)}
            return MqttReply(None, _failure(None, exc, False), event)
        try:
            doc = parse_body(payload, replace(self.core.limits, max_body_bytes=max_payload))
        except InputError as exc:
            self.core.count_error(exc)
            what = "the payload is not JSON" if exc.reason == "invalid_json" else str(exc)
            error = InputError(f"not a request: {what}", exc.reason)
            return MqttReply(
                None, _failure(None, error, False), {"event": "bad_request", "error": str(error)}
            )
        if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
            return self._oip(doc, arrived, full)
        return self._tensor(doc, arrived, full)

    def _oip(self, doc: dict[str, Any], arrived: float, full: bool) -> MqttReply:
        request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        params = doc.get("parameters")
        params = params if isinstance(params, dict) else {}
        reply_to = doc.get("reply_to") or params.get("reply_to")
        reply_to = reply_to if isinstance(reply_to, str) else None
        try:
            if full:
                raise self._busy()
            # OIP's answer, with the ok every MQTT reply carries (an extra field to OIP clients).
            return MqttReply(reply_to, {**self.infer(doc, arrived=arrived), "ok": True})
        except EdgebentoError as exc:
            return MqttReply(reply_to, _failure(request_id, exc, True))

    def _tensor(self, doc: Any, arrived: float, full: bool) -> MqttReply:
        raw = doc if isinstance(doc, dict) else {}
        reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
        try:
            request = InferRequest.model_validate(doc)
        except ValidationError as exc:
            error = InputError(f"not a request: {exc.errors()[0]['msg']}", reason="invalid")
            self.core.count_error(error)
            body = _failure(str(raw.get("id", "")), error, False)
            return MqttReply(reply_to, body, {"event": "bad_request", "error": str(error)})
        if request.expired():
            error_text = f"infer {request.id} expired at {request.expires_at}; dropped"
            body = {"schema_version": 1, "id": request.id, "ok": False, "error": error_text}
            body.update(expired=True, reason="expired")
            return MqttReply(request.reply_to, body, {"event": "expired", "id": request.id})
        args = request.body()
        timeout_ms = args.get("timeout_ms")
        timeout_s = None  # a bool is an int to Python, not a number of ms
        if isinstance(timeout_ms, int | float) and not isinstance(timeout_ms, bool):
            timeout_s = timeout_ms / 1000 if timeout_ms > 0 else None
        try:
            if full:
                raise self._busy()
            answer = self.infer({"inputs": args.get("inputs")}, timeout_s, arrived)
        except EdgebentoError as exc:
            return MqttReply(request.reply_to, _failure(request.id, exc, False))
        return MqttReply(
            request.reply_to, {"schema_version": 1, "id": request.id, "ok": True, **answer}
        )

    def _busy(self) -> OverloadError:
        limits = self.core.limits
        exc = OverloadError(
            f"the device's inference queue is full ({limits.max_queue} waiting); retry shortly",
            reason="queue_full",
            retry_after_s=limits.retry_after_s,
        )
        self.core.count_error(exc)
        return exc
