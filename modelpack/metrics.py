"""The inference metrics every target exports under the same names."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class InferenceMetrics:
    """``edgebento_inference_seconds``, ``edgebento_requests_total{outcome}``,
    ``edgebento_input_rejected_total{reason}`` and ``edgebento_model_info{name,version}``.

    ``lib`` is prometheus_client (the default) or anything with its Counter, Gauge and
    Histogram API, such as ``bentoml.metrics`` inside a BentoML service.
    """

    def __init__(self, lib: ModuleType | Any = None, registry: Any = None) -> None:
        if lib is None:
            import prometheus_client

            lib = prometheus_client
        extra = {} if registry is None else {"registry": registry}
        self.inference_seconds = lib.Histogram(
            "edgebento_inference_seconds",
            "Time spent running the model, per request.",
            buckets=LATENCY_BUCKETS,
            **extra,
        )
        self.requests = lib.Counter(
            "edgebento_requests", "Inference requests by outcome.", ["outcome"], **extra
        )
        self.rejected = lib.Counter(
            "edgebento_input_rejected",
            "Inference requests refused for bad input, by reason.",
            ["reason"],
            **extra,
        )
        self.model_info = lib.Gauge(
            "edgebento_model_info",
            "The model being served (value 1).",
            ["name", "version"],
            **extra,
        )
        self._current: tuple[str, str] | None = None

    def set_model(self, name: str, version: int | str) -> None:
        if self._current is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(*self._current)
        self._current = (name, str(version))
        self.model_info.labels(*self._current).set(1)

    def ok(self, seconds: float) -> None:
        self.inference_seconds.observe(seconds)
        self.requests.labels("ok").inc()

    def rejected_input(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
        self.requests.labels("rejected").inc()

    def failed(self) -> None:
        self.requests.labels("error").inc()
