"""Local inference: the live Predictor, swapped atomically, and the counts telemetry reports."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

from modelpack.codec import encode_response
from modelpack.errors import EdgebentoError, InferenceError, InputError
from modelpack.metrics import LATENCY_BUCKETS
from modelpack.predictor import Predictor

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


class InferenceService:
    """Runs requests on whatever predictor is live; a swap never fails a request in flight.

    A request takes one reference to the predictor when it starts and keeps it to the end, so
    swapping only changes what the next request sees; the old session is freed with its last user.
    """

    def __init__(self, metrics: Any = None) -> None:
        self.predictor: Predictor | None = None
        self.stats = InferenceStats()
        self.metrics = metrics  # modelpack.metrics.InferenceMetrics when /metrics is served
        self.observers: list[Observer] = []
        self.max_batch = 256

    def swap(self, predictor: Predictor) -> Predictor | None:
        old, self.predictor = self.predictor, predictor
        if self.metrics is not None:
            ref = predictor.model_ref
            self.metrics.set_model(ref.get("name", "?"), ref.get("version", "?"))
        return old

    @property
    def model_ref(self) -> dict[str, Any] | None:
        predictor = self.predictor
        return None if predictor is None else dict(predictor.model_ref)

    def infer(self, payload: Any) -> dict[str, Any]:
        """Tensor JSON in, tensor JSON out; raises InputError or InferenceError."""
        predictor = self.predictor
        if predictor is None:
            self.stats.observe_error()
            raise InferenceError("no model is installed on this device yet")
        start = time.perf_counter()
        try:
            from modelpack.codec import decode_request

            inputs = decode_request(payload)
            for name, array in inputs.items():
                if array.ndim and array.shape[0] > self.max_batch:
                    raise InputError(
                        f"input {name!r}: batch of {array.shape[0]} is over the device's cap of {self.max_batch}",
                        reason="batch_too_large",
                    )
            outputs = predictor.run(inputs)
        except InputError as exc:
            self.stats.observe_rejected(exc.reason)
            if self.metrics is not None:
                self.metrics.rejected_input(exc.reason)
            raise
        except EdgebentoError:
            self.stats.observe_error()
            if self.metrics is not None:
                self.metrics.failed()
            raise
        seconds = time.perf_counter() - start
        self.stats.observe_ok(seconds)
        if self.metrics is not None:
            self.metrics.ok(seconds)
        answer = encode_response(outputs, predictor.model_ref, seconds * 1000)
        for observe in self.observers:
            observe(payload, answer)
        return answer
