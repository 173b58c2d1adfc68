"""The serving metrics every target exports under the same names (docs/metrics.md)."""

from __future__ import annotations

import bisect
import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def observe_many(histogram: Any, amounts: Sequence[float]) -> None:
    """``histogram.observe`` of each amount, in one write to its sum and one to each bucket
    the amounts fall in: under BentoML every write is a locked write to a file shared by the
    workers, and a batch of 16 took 32 of them. A histogram without prometheus_client's
    buckets (another ``lib``) is observed one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(amounts) < 2 or bounds is None or buckets is None or total is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    for amount in amounts:
        if amount == amount:  # NaN falls in no bucket, as with observe
            counts[bisect.bisect_left(bounds, amount)] += 1
    total.inc(math.fsum(amounts))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class InferenceMetrics:
    """``edgebento_inference_seconds``, ``edgebento_requests_total{outcome}``,
    ``edgebento_input_rejected_total{reason}``, ``edgebento_overload_rejected_total{reason}``,
    ``edgebento_request_errors_total{reason}``,
    ``edgebento_queue_depth``, ``edgebento_queue_wait_seconds``, ``edgebento_batch_size``,
    ``edgebento_cache_hits_total``, ``edgebento_cache_misses_total`` and
    ``edgebento_model_info{name,version}``.

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
            "Latency of each answered request, from its arrival to its answer (queue wait included).",
            buckets=LATENCY_BUCKETS,
            **extra,
        )
        self.requests = lib.Counter(
            "edgebento_requests", "Inference requests by outcome.", ["outcome"], **extra
        )
        self.rejected = lib.Counter(
            "edgebento_input_rejected",
            "Inference requests refused with a 4xx, by reason.",
            ["reason"],
            **extra,
        )
        self.overload = lib.Counter(
            "edgebento_overload_rejected",
            "Inference requests refused because the model could not start them in time.",
            ["reason"],
            **extra,
        )
        self.errors = lib.Counter(
            "edgebento_request_errors",
            "Inference requests that failed on the server's side (5xx), by reason.",
            ["reason"],
            **extra,
        )
        self.depth = lib.Gauge("edgebento_queue_depth", "Requests waiting to start.", **extra)
        self._depth = -1  # the depth last set: a set costs a locked write to a shared file
        self.wait = lib.Histogram(
            "edgebento_queue_wait_seconds",
            "Time from arrival to the start of its batch.",
            buckets=LATENCY_BUCKETS,
            **extra,
        )
        self.batch_size = lib.Histogram(
            "edgebento_batch_size", "Rows per batch run.", buckets=BATCH_BUCKETS, **extra
        )
        self.cache_hits = lib.Counter(
            "edgebento_cache_hits", "Answers served from the result cache.", **extra
        )
        self.cache_misses = lib.Counter(
            "edgebento_cache_misses", "Result cache look-ups that missed.", **extra
        )
        self.model_info = lib.Gauge(
            "edgebento_model_info",
            "The model being served (value 1).",
            ["name", "version"],
            **extra,
        )
        self.expires = lib.Gauge(
            "edgebento_model_expires_timestamp_seconds",
            "The served pack's expires_at (unix time), when it has one.",
            ["name", "version"],
            **extra,
        )
        self._current: tuple[str, str] | None = None
        # Labelled children by (metric, label): ``labels()`` costs a lock and a lookup on each
        # request, and under a flood each refusal counts twice. The labels are a closed set.
        self._children: dict[tuple[int, str], Any] = {}
        self._overloaded: dict[str, tuple[Callable[[float], None], Callable[[float], None]]] = {}
        # Refusals counted in this turn of each running event loop, not yet written, by reason.
        self._refusals: dict[Any, dict[str, int]] = {}
        # None: a loop's refusals are written at its next turn; else this many seconds later.
        self._refusals_every_s: float | None = None
        # Latencies of answers given in this turn of each running event loop, not yet written.
        self._latencies: dict[Any, list[float]] = {}

    def _child(self, metric: Any, label: str) -> Any:
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def set_model(self, name: str, version: int | str, expires_at: float | None = None) -> None:
        if self._current is not None:
            for gauge in (self.model_info, self.expires):
                with contextlib.suppress(KeyError):
                    gauge.remove(*self._current)
        self._current = (name, str(version))
        self.model_info.labels(*self._current).set(1)
        if expires_at is not None:  # the alert rules warn days ahead (EdgebentoPackExpiringSoon)
            self.expires.labels(*self._current).set(expires_at)

    def ok(self, seconds: float) -> None:
        """Count an answer, before it leaves (a client that has it finds it counted), and its
        latency: at once outside an event loop; on one, all of a turn's (a batch's answers come
        in one turn) in one write at the start of the loop's next turn, before anything read
        meanwhile runs. Under BentoML an observe is two locked writes to a file shared by the
        workers: 2 µs of a 150 µs request."""
        self._child(self.requests, "ok").inc()
        # asyncio only if something loaded it: threaded targets (the agent) never do.
        asyncio = sys.modules.get("asyncio")
        loop = asyncio._get_running_loop() if asyncio is not None else None
        if loop is None:
            self.inference_seconds.observe(seconds)
            return
        pending = self._latencies.get(loop)
        if pending is None:
            pending = self._latencies[loop] = []
            loop.call_soon(self._write_latencies, loop)
        pending.append(seconds)

    def _write_latencies(self, loop: Any) -> None:
        observe_many(self.inference_seconds, self._latencies.pop(loop, ()))

    def rejected_input(self, reason: str) -> None:
        self._child(self.rejected, reason).inc()
        self._child(self.requests, "rejected").inc()

    def overloaded(self, reason: str) -> None:
        """Count a refusal: at once outside an event loop; on one, all of a turn's in one write
        per reason at the start of the loop's next turn, before anything read meanwhile runs
        (a client that has its 503 and asks ``/metrics`` finds it counted). Under a flood most
        requests come here, many in a turn, and each write is a locked write to a file shared
        by the workers: two of them were a tenth of a refusal's CPU. ``write_refusals_every``
        writes them later still, for a server that writes them before each scrape it serves
        (a scrape another worker serves may then find them a delay and a turn late)."""
        asyncio = sys.modules.get("asyncio")
        loop = asyncio._get_running_loop() if asyncio is not None else None
        if loop is None:
            self._write_overloaded(reason, 1)
            return
        pending = self._refusals.get(loop)
        if pending is None:
            pending = self._refusals[loop] = {}
            every = self._refusals_every_s
            if every is None:
                loop.call_soon(self._write_refusals, loop)
            else:
                loop.call_later(every, self._write_refusals, loop)
        pending[reason] = pending.get(reason, 0) + 1

    def write_refusals_every(self, seconds: float) -> None:
        """Write an event loop's refusals ``seconds`` after the first not yet written, not at
        its next turn: for a server that calls ``write_pending`` on the loop before every scrape
        it serves and when it stops (BentoML's service, ``bentos/service.py``). Under a flood a
        turn answered about three refusals, and its write (two locked writes to files shared
        by the workers) cost the real worker 12 µs of CPU: 4 µs a refusal."""
        self._refusals_every_s = seconds

    def write_pending(self) -> None:
        """Write the running loop's refusals not yet written (on the loop's thread)."""
        asyncio = sys.modules.get("asyncio")
        loop = asyncio._get_running_loop() if asyncio is not None else None
        if loop is not None:
            self._write_refusals(loop)

    def _write_refusals(self, loop: Any) -> None:
        for reason, count in self._refusals.pop(loop, {}).items():
            self._write_overloaded(reason, count)

    def _write_overloaded(self, reason: str, count: int) -> None:
        # Both children found with one look-up.
        incs = self._overloaded.get(reason)
        if incs is None:
            incs = self._overloaded[reason] = (
                self._child(self.overload, reason).inc,
                self._child(self.requests, "overloaded").inc,
            )
        incs[0](count)
        incs[1](count)

    def failed(self, reason: str = "internal") -> None:
        self._child(self.errors, reason).inc()
        self._child(self.requests, "error").inc()

    def queue_depth(self, depth: int) -> None:
        if depth != self._depth:
            self._depth = depth
            self.depth.set(depth)

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def queue_waits(self, seconds: Sequence[float]) -> None:
        """A batch's waits, written as ``queue_wait`` one by one would (the same counts, the
        same sum up to float rounding), before the batch's answers are released."""
        observe_many(self.wait, seconds)

    def batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def cache(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()


class NoMetrics(InferenceMetrics):
    """For a process that exports no metrics (a device without /metrics): counts nothing."""

    def __init__(self) -> None:
        self._current = None

    def set_model(self, name: str, version: int | str, expires_at: float | None = None) -> None:
        pass

    def ok(self, seconds: float) -> None:
        pass

    def rejected_input(self, reason: str) -> None:
        pass

    def overloaded(self, reason: str) -> None:
        pass

    def write_refusals_every(self, seconds: float) -> None:
        pass

    def write_pending(self) -> None:
        pass

    def failed(self, reason: str = "internal") -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def queue_waits(self, seconds: Sequence[float]) -> None:
        for one in seconds:  # one by one: a subclass that counts queue_wait counts these too
            self.queue_wait(one)

    def batch(self, rows: int) -> None:
        pass

    def cache(self, hit: bool) -> None:
        pass
