"""Local inference: the serving core behind MQTT, the local HTTP endpoint and pipelines, the live
model swapped atomically, the bounded queue they share, and the counts telemetry reports.

What arrives on MQTT (the infer topic, ``edge_agent.infer_topic``, and pipelines) waits in one
queue of ``max_queue`` requests; past it a request is refused at once (``queue_full``), and one
that waited past its deadline, counted from its arrival, is refused before it is parsed
(``deadline``). A device without a model answers 503 ``not_ready`` with how to install one; that
is not the model's error, so it is never counted as ``outcome="error"``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_agent.drift import DriftCore
from modelpack.codec import encode_response
from modelpack.errors import EdgebentoError, OverloadError
from modelpack.metrics import LATENCY_BUCKETS, InferenceMetrics, NoMetrics
from modelpack.predictor import Predictor
from modelpack.serving import oip
from modelpack.serving.limits import ServingLimits
from modelpack.serving.reasons import NotReadyError

log = logging.getLogger(__name__)


def install_hint(prefix: str = "edgebento", device: str = "DEVICE") -> str:
    """What an empty device tells whoever asks it for an answer: each way to install a model."""
    return (
        f"install one with a deploy command on {prefix}/{device}/cmd/deploy "
        '({"id": "d1", "name": NAME, "version": N} with the agent\'s --store, or {"id": "d1", '
        f'"url": ...}}), with `edgebento rollout NAME VERSION --devices {device} --store URL '
        "--broker URL --key KEY`, or by starting the agent with --pack DIR"
    )


_NOT_READY = ("not_ready", "load_failed")


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
        self.stats.observe_rejected("not_ready" if reason in _NOT_READY else "busy")

    def failed(self, reason: str = "internal") -> None:
        self.inner.failed(reason)
        self.stats.observe_error()

    def queue_depth(self, depth: int) -> None:
        self.inner.queue_depth(depth)

    def queue_wait(self, seconds: float) -> None:
        self.inner.queue_wait(seconds)

    def batch(self, rows: int) -> None:
        self.inner.batch(rows)

    def cache(self, hit: bool) -> None:
        self.inner.cache(hit)


@dataclass(frozen=True)
class Answer:
    doc: dict[str, Any]  # for ``codec.dumps``: its floats are written already (``codec.numbers``)
    outputs: Mapping[str, np.ndarray]


class InferenceService:
    """Runs requests on whatever model is live; a swap never fails a request in flight.

    A request takes one reference to the model when it starts and keeps it to the end, so
    swapping only changes what the next request sees; the old session is freed with its last user.
    Observers (capture) see each answer as it is sent: write it with ``codec.dumps``.
    """

    def __init__(
        self,
        metrics: InferenceMetrics | None = None,
        limits: ServingLimits | None = None,
        running: int = 1,
    ) -> None:
        self.stats = InferenceStats()
        self.core = DriftCore(
            limits or ServingLimits(max_rows=256, max_queue=64),
            _Counted(metrics or NoMetrics(), self.stats),
            batching=False,
            running=running,
        )
        self.observers: list[Observer] = self.core.observers
        self.install_hint = install_hint()  # the dispatcher names the device in it
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

    def unserve(self) -> Predictor | None:
        """Serve no model: requests are answered ``not_ready`` (requests in flight finish)."""
        old = self.predictor
        self.core.model = None
        return old

    @property
    def model_ref(self) -> dict[str, Any] | None:
        predictor = self.predictor
        return None if predictor is None else dict(predictor.model_ref)

    def _ready(self) -> None:
        if self.core.model is None:
            exc = NotReadyError(f"no model is installed on this device yet; {self.install_hint}")
            self.core.count_error(exc)
            raise exc

    def infer(
        self, payload: Any, timeout_s: float | None = None, arrived: float | None = None
    ) -> dict[str, Any]:
        """A parsed request (tensor JSON or OIP) in, its answer as plain JSON values out;
        raises EdgebentoError."""
        self._ready()
        return self.core.infer_doc(payload, timeout_s, arrived)

    def run(
        self, payload: Any, timeout_s: float | None = None, arrived: float | None = None
    ) -> Answer:
        """``infer`` for an answer that is sent: its document goes to ``codec.dumps``, which
        writes float32 with 9 significant digits as every target does (float64's 17 are noise)."""
        self._ready()
        core = self.core
        oip_form = isinstance(payload, Mapping) and isinstance(payload.get("inputs"), list)
        try:
            job = core.prepare(
                "oip" if oip_form else "tensor", doc=payload, timeout_s=timeout_s, arrived=arrived
            )
            job = core.run_sync(job)
        except EdgebentoError as exc:
            core.count_error(exc)
            raise
        seconds = time.monotonic() - job.arrived
        core.metrics.ok(seconds)
        if job.oip is not None:
            doc, _ = oip.answer_doc(
                job.oip, job.outputs, job.model.name, job.model.version, json_only=True, body=True
            )
        else:
            ref = job.model.predictor.model_ref
            doc = encode_response(job.outputs, ref, seconds * 1000, body=True)
        for observe in core.observers:
            observe(job.doc, doc)
        return Answer(doc, job.outputs)

    # --- the queue ahead of the model (MQTT requests and pipeline readings) ---------------------

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

    def busy(self) -> OverloadError:
        """The refusal of a request that found the queue full (counted)."""
        queued = self.core.limits.max_queue
        return self._refused(
            f"the device's inference queue is full ({queued} waiting)", "queue_full"
        )

    def late(self, arrived: float) -> OverloadError | None:
        """The refusal (counted) of a request that waited past the deadline since it arrived,
        checked before it is parsed: parsing it would be wasted work. A client's own shorter
        deadline is applied once it is read."""
        waited = time.monotonic() - arrived
        if waited <= self.core.limits.deadline(None):
            return None
        return self._refused(f"the request waited {waited:.3f} s since it arrived", "deadline")

    def _refused(self, why: str, reason: str) -> OverloadError:
        retry = self.core.limits.retry_after_s
        exc = OverloadError(f"{why}; retry shortly", reason=reason, retry_after_s=retry)
        self.core.count_error(exc)
        return exc
