"""The serving core: one path from a request to an answer for every target.

Parse (tensor JSON, the Open Inference Protocol, its binary extension), validate against the io
signature before anything is allocated or run, run (batched or alone, behind a bounded queue with
deadlines, through the optional result cache), encode (NaN and infinity made JSON-safe), and map
every error to one status and reason. BentoML, Lambda, the agent's MQTT and HTTP inference and
its pipelines are thin adapters over ``ServingCore``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from modelpack.codec import decode_request, dumps, encode_response, parse_body
from modelpack.errors import EdgebentoError, InputError, OverloadError
from modelpack.manifest import Manifest
from modelpack.metrics import InferenceMetrics, NoMetrics
from modelpack.predictor import Predictor
from modelpack.serving import oip
from modelpack.serving.cache import cache_key
from modelpack.serving.kept import keep
from modelpack.serving.limits import ServingLimits
from modelpack.serving.model import ServedModel
from modelpack.serving.padding import check_lengths
from modelpack.serving.reasons import NotFoundRoute, NotReadyError, reason_of

Protocol = Literal["tensor", "oip"]
TIMEOUT_HEADER = "x-timeout-ms"  # a client's shorter deadline, in milliseconds


@dataclass
class Job:
    """One parsed, validated request on its way through the model."""

    model: ServedModel
    protocol: Protocol
    feed: dict[str, np.ndarray]
    rows: int
    arrived: float
    deadline: float
    oip: oip.OipRequest | None = None
    doc: Any = None  # the parsed request document (what capture keeps)
    key: bytes | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


# Deadline refusals ``ServingCore.refusal`` keeps built: a second of work ahead, by the ms.
LATE_REFUSALS_KEPT = 1024

# A deadline a client asks for is shortened to the server's anyway; past a day it is a mistake
# (or a probe: "1" followed by 400 zeros), answered 400 rather than carried as infinity.
MAX_CLIENT_TIMEOUT_S = 86_400.0


def checked_timeout(value: float, what: str) -> float:
    """A client's timeout in seconds: positive, finite, at most a day; else a 400."""
    if not 0 < value <= MAX_CLIENT_TIMEOUT_S:  # also False for NaN
        raise InputError(
            f"{what} must be above 0 and at most {MAX_CLIENT_TIMEOUT_S:g} s, got {value!r}",
            reason="invalid",
        )
    return value


# Timeouts a client sent before, parsed: a flood sends the same few values. Bounded (the values
# are the client's): emptied when full.
_PARSED_TIMEOUTS: dict[str, float] = {}
_PARSED_KEPT = 64
# float() of thousands of digits is work for nothing: no timeout is that long.
TIMEOUT_MAX_CHARS = 64


def _timeout_header(headers: Mapping[str, str]) -> float | None:
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    parsed = _PARSED_TIMEOUTS.get(raw)
    if parsed is not None:
        return parsed
    return keep(_PARSED_TIMEOUTS, raw, _parsed_timeout(raw), _PARSED_KEPT)


def _parsed_timeout(raw: str) -> float:
    if len(raw) > TIMEOUT_MAX_CHARS:
        raise InputError(f"{TIMEOUT_HEADER} is {len(raw)} characters long", reason="invalid")
    try:
        value = float(raw)
    except ValueError as exc:
        raise InputError(
            f"{TIMEOUT_HEADER} {raw!r} is not a number of ms", reason="invalid"
        ) from exc
    return checked_timeout(value / 1000, TIMEOUT_HEADER)


def _oip_timeout(request: oip.OipRequest) -> float | None:
    try:
        value = request.timeout_s
    except OverflowError:  # an integer past float's range (a client's 1 and 400 zeros)
        value = float("inf")
    return None if value is None else checked_timeout(value, "parameters.timeout")


class ServingCore:
    """The model being served (swappable), its limits and its metrics."""

    def __init__(
        self,
        limits: ServingLimits | None = None,
        metrics: InferenceMetrics | None = None,
        batching: bool = True,
        running: int = 1,
    ) -> None:
        self.limits = limits or ServingLimits()
        self.metrics = metrics or NoMetrics()
        self.batching = batching
        self.running = running
        self.model: ServedModel | None = None
        self.load_error: str | None = None  # why no model could be loaded (answered as 503)
        # Called with (request document, answer document) after every success (capture).
        self.observers: list[Callable[[Any, dict[str, Any]], None]] = []
        # ``refusal``'s answer when the queue is full, whatever the request: one instance,
        # returned and never raised (a raise would chain tracebacks onto it). Under a flood
        # most requests get it, and building the error was a tenth of a refusal's check.
        self.queue_full = self._queue_full()
        # Its deadline refusals by message (the work ahead, to the millisecond): built once
        # each, returned and never raised, as ``queue_full``. Emptied when full.
        self._late: dict[str, OverloadError] = {}

    def serve(
        self,
        predictor: Predictor,
        manifest: Manifest | None = None,
        about: Mapping[str, Any] | None = None,
        samples: Mapping[str, np.ndarray] | None = None,
    ) -> ServedModel:
        """Make ``predictor`` the live model; requests in flight finish on the old one.
        ``samples``: inputs the model is known to answer (the pack's golden samples), which
        tell a client's input the model cannot run (400) from a broken model (500)."""
        model = ServedModel(
            predictor,
            self.limits,
            self.metrics,
            manifest,
            self.batching,
            self.running,
            about,
            samples,
        )
        self.model, self.load_error = model, None
        expires = manifest.expires_at if manifest is not None else None
        self.metrics.set_model(model.name, model.version, expires.timestamp() if expires else None)
        return model

    # --- the three steps ----------------------------------------------------------------------

    def live(self, name: str | None = None, version: str | None = None) -> ServedModel:
        model = self.model
        if model is None:
            reason = "load_failed" if self.load_error else "not_ready"
            raise NotReadyError(self.load_error or "no model is loaded yet", reason=reason)
        if name is not None and name != model.name:
            raise NotFoundRoute(f"no model {name!r}; this server serves {model.name!r}")
        if version not in (None, "", model.version):
            raise NotFoundRoute(
                f"model {name!r} has no version {version!r}; it serves {model.version}"
            )
        return model

    def prepare(
        self,
        protocol: Protocol,
        body: bytes | bytearray | None = None,
        doc: Any = None,
        headers: Mapping[str, str] | None = None,
        model: ServedModel | None = None,
        timeout_s: float | None = None,
        arrived: float | None = None,
        admitted: bool = False,
    ) -> Job:
        """Parse and validate a request (a body, or a document parsed already). ``admitted``:
        ``admit`` let it in just before its body was read (the queue checks it again)."""
        arrived = time.monotonic() if arrived is None else arrived
        headers = headers or {}
        model = model or self.live()
        header_timeout = _timeout_header(headers)
        if not admitted:
            self._admit(model, arrived + self.limits.deadline(header_timeout or timeout_s))
        binary = None
        if doc is None:
            if protocol == "oip":
                body, binary = oip.split_body(body or b"", headers.get(oip.HEADER_LENGTH))
            doc = parse_body(body, self.limits)
        request = None
        if protocol == "oip":
            request = oip.decode(doc, binary, model.inputs, model.predictor.outputs, self.limits)
            feed = request.inputs
            timeout_s = _oip_timeout(request) or timeout_s
        else:
            feed = decode_request(doc, model.inputs, self.limits)
        timeout_s = header_timeout or timeout_s
        rows = model.feed_checks.rows(feed, self.limits)
        if model.plan is not None:
            check_lengths(feed, model.plan)
        deadline = arrived + self.limits.deadline(timeout_s)
        return Job(model, protocol, feed, rows, arrived, deadline, request, doc)

    def admit(self, model: ServedModel, headers: Mapping[str, str], arrived: float) -> bool:
        """The check ``prepare`` starts with, for a request whose body is not read yet: raise
        OverloadError when the queue cannot start it before its deadline. False: not checked
        (a header ``prepare`` refuses, with the rest of the request's faults)."""
        try:
            header_timeout = _timeout_header(headers)
        except InputError:
            return False
        self._admit(model, arrived + self.limits.deadline(header_timeout))
        return True

    def refusal(
        self, model: ServedModel, headers: Mapping[str, str], arrived: float
    ) -> OverloadError | None:
        """``admit``'s refusal returned, not raised (a raise costs a traceback and its frames,
        under a flood on most requests); None when it admits or does not check. It reads one
        header of ``headers``: ``TIMEOUT_HEADER``."""
        try:
            header_timeout = _timeout_header(headers)
        except InputError:
            return None
        batcher = model.batcher
        if batcher.full() or model.gate.full():
            if self.queue_full.retry_after_s != self.limits.retry_after_s:  # limits replaced
                self.queue_full = self._queue_full()
            return self.queue_full
        if not batcher.would_miss(arrived + self.limits.deadline(header_timeout)):
            return None
        # ``batcher.refuse_late()``, not built again for a message seen: with its answer kept
        # by the server too, a deadline refusal took the real worker 38 µs of CPU, now 28.
        message = batcher.late_message()
        late = self._late.get(message)
        if late is None or late.retry_after_s != batcher.retry_after_s:
            late = OverloadError(message, reason="deadline", retry_after_s=batcher.retry_after_s)
            keep(self._late, message, late, LATE_REFUSALS_KEPT)
        return late

    def _admit(self, model: ServedModel, deadline: float) -> None:
        """Refuse before parsing what cannot start in time: parsing it would be wasted work."""
        refusal = self._refusal(model, deadline)
        if refusal is not None:
            raise refusal

    def _refusal(self, model: ServedModel, deadline: float) -> OverloadError | None:
        if model.batcher.full() or model.gate.full():
            return self._queue_full()
        if model.batcher.would_miss(deadline):
            return model.batcher.refuse_late()
        return None

    def _queue_full(self) -> OverloadError:
        return OverloadError(
            "the model's queue is full; retry shortly",
            reason="queue_full",
            retry_after_s=self.limits.retry_after_s,
        )

    def _cached(self, job: Job) -> bool:
        cache = job.model.cache
        if cache is None:
            return False
        job.key = cache_key(job.feed)
        found = cache.get(job.key)
        self.metrics.cache(found is not None)
        if found is not None:
            job.outputs = found
        return found is not None

    def _remember(self, job: Job) -> None:
        if job.model.cache is not None and job.key is not None:
            job.model.cache.put(job.key, job.outputs)

    async def run(self, job: Job) -> Job:
        if not self._cached(job):
            job.outputs = await job.model.batcher.submit(job.feed, job.rows, job.deadline)
            self._remember(job)
        return job

    def run_sync(self, job: Job) -> Job:
        if not self._cached(job):
            with job.model.gate.slot(job.deadline, job.arrived):
                # One model run of the request's rows: edgebento_batch_size means what the
                # Batcher's runs mean (a run that fails counted too), a cached answer no run.
                self.metrics.batch(job.rows)
                job.outputs = job.model.run(job.feed)
            self._remember(job)
        return job

    def _observed(self, job: Job, answer: dict[str, Any]) -> dict[str, Any]:
        for observe in self.observers:
            observe(job.doc, answer)
        return answer

    def answer(self, job: Job, body: bool = False) -> dict[str, Any]:
        """The answer document (tensor JSON, or OIP with every output in JSON). ``body``: it goes
        straight to ``dumps``, so its numbers may be written already (observers see plain lists)."""
        seconds = time.monotonic() - job.arrived
        self.metrics.ok(seconds)
        body = body and not self.observers
        if job.oip is not None:
            doc, _ = oip.answer_doc(
                job.oip, job.outputs, job.model.name, job.model.version, json_only=True, body=body
            )
            return self._observed(job, doc)
        ref = job.model.predictor.model_ref
        answer = encode_response(job.outputs, ref, seconds * 1000, body=body)
        return self._observed(job, answer)

    def encode(self, job: Job) -> tuple[bytes, dict[str, str]]:
        """The answer body and its headers, binary outputs included."""
        if job.oip is None:
            return dumps(self.answer(job, body=True)), {"content-type": "application/json"}
        self.metrics.ok(time.monotonic() - job.arrived)
        doc, blobs = oip.answer_doc(
            job.oip, job.outputs, job.model.name, job.model.version, body=not self.observers
        )
        self._observed(job, doc)
        header = dumps(doc)
        if not blobs:
            return header, {"content-type": "application/json"}
        return header + b"".join(blobs), {
            "content-type": "application/octet-stream",
            oip.HEADER_LENGTH: str(len(header)),
        }

    def count_error(self, exc: BaseException) -> None:
        """Count a refusal by whose it is: the client's (4xx) as ``rejected``, a 503 (overload,
        no model yet) as ``overloaded``, and only the model's or ours as an ``error``, the
        figure a rollout's error rate reads."""
        if isinstance(exc, InputError):
            self.metrics.rejected_input(exc.reason)
        elif isinstance(exc, OverloadError | NotReadyError):
            self.metrics.overloaded(exc.reason)
        else:
            self.metrics.failed(reason_of(exc))

    # --- documents for callers that parse their own envelope (MQTT, pipelines) ---------------

    def infer_doc(
        self,
        doc: Any,
        timeout_s: float | None = None,
        arrived: float | None = None,
    ) -> dict[str, Any]:
        """A parsed request (tensor JSON ``{"inputs": {...}}`` or OIP ``{"inputs": [...]}``) to
        its answer document, synchronously; raises the error to report (counted)."""
        try:
            protocol: Protocol = (
                "oip"
                if isinstance(doc, Mapping) and isinstance(doc.get("inputs"), list)
                else "tensor"
            )
            job = self.prepare(protocol, doc=doc, timeout_s=timeout_s, arrived=arrived)
            return self.answer(self.run_sync(job))
        except EdgebentoError as exc:
            self.count_error(exc)
            raise
