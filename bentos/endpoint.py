"""One served model, whatever carries the requests (BentoML or a Lambda event).

It turns a raw body into an answer and an HTTP status: client errors become 4xx with the
reason, counted in the metrics by reason; only a failure of our own is a 5xx.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bentos.batching import Batcher
from bentos.padding import sequence_axis
from modelpack import Pack, Predictor, PredictorOptions
from modelpack.codec import MAX_BODY_BYTES, decode_request, encode_response, error_body, parse_body
from modelpack.errors import EdgebentoError, InputError
from modelpack.metrics import InferenceMetrics

# A reason -> HTTP status; every other refused input is a plain 400.
STATUS_BY_REASON = {"too_large": 413, "batch_too_large": 413}


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def json_safe(array: Any) -> Any:
    """NaN and infinity have no JSON spelling: they are answered as null."""
    array = np.asarray(array)
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array
    return np.where(np.isfinite(array), array, None)


def _private_metrics() -> InferenceMetrics:
    """Metrics of a registry of their own, so several endpoints can live in one process."""
    from prometheus_client import CollectorRegistry

    return InferenceMetrics(registry=CollectorRegistry())


class ModelEndpoint:
    """A verified pack behind the tensor JSON contract, with metrics and adaptive batching."""

    def __init__(
        self,
        pack: Pack,
        metrics: InferenceMetrics | None = None,
        options: PredictorOptions | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_batch_rows: int = 64,
        batching: bool = True,
    ) -> None:
        self.pack = pack
        self.manifest = pack.manifest
        self.predictor = Predictor.from_pack(pack, options)
        self.metrics = metrics or _private_metrics()
        self.metrics.set_model(self.manifest.name, self.manifest.version)
        self.max_body_bytes = max_body_bytes
        self.plan = sequence_axis(self.manifest)
        batchable = self.predictor.batch_dynamic and all(
            s.batch_dynamic for s in self.manifest.outputs
        )
        self.batcher = (
            Batcher(self._run, self.plan, max_rows=max_batch_rows)
            if batching and batchable
            else None
        )

    def _run(self, feed: dict[str, Any]) -> dict[str, Any]:
        return self.predictor.run(feed, validate=False)

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": m.model_ref,
            "manifest": m.model_dump(mode="json"),
            "manifest_sha256": self.pack.manifest_sha256,
            "signed_by": self.pack.signed_by,
            "inputs": [s.model_dump(mode="json") for s in m.inputs],
            "outputs": [s.model_dump(mode="json") for s in m.outputs],
            "batching": self.batcher is not None,
            # This worker's batches so far: rows / batches is the mean batch size under load.
            "batches": {
                "count": self.batcher.batches if self.batcher else 0,
                "rows": self.batcher.rows if self.batcher else 0,
            },
            "sequence": [s.model_dump(mode="json") for s in m.sequence],
        }

    def refuse(self, exc: InputError) -> Answer:
        self.metrics.rejected_input(exc.reason)
        return Answer(STATUS_BY_REASON.get(exc.reason, 400), error_body(exc))

    def _answer(self, outputs: dict[str, Any], start: float) -> Answer:
        seconds = time.perf_counter() - start
        self.metrics.ok(seconds)
        outputs = {name: json_safe(array) for name, array in outputs.items()}
        return Answer(200, encode_response(outputs, self.manifest.model_ref, seconds * 1000))

    def _failed(self, exc: Exception) -> Answer:
        self.metrics.failed()
        message = str(exc) if isinstance(exc, EdgebentoError) else "internal error"
        return Answer(500, {"error": message, "reason": "internal"})

    async def predict(self, body: bytes | str | None) -> Answer:
        """A request body in, an answer out; ORT runs in a worker thread, batched."""
        start = time.perf_counter()
        try:
            feed = self.predictor.validate(decode_request(parse_body(body, self.max_body_bytes)))
            if self.batcher is not None:
                outputs = await self.batcher.submit(feed)
            else:
                outputs = await asyncio.to_thread(self._run, feed)
        except InputError as exc:
            return self.refuse(exc)
        except Exception as exc:
            return self._failed(exc)
        return self._answer(outputs, start)

    def predict_sync(self, payload: Any, parsed: bool = False) -> Answer:
        """The same contract without an event loop (the Lambda handler): no batching."""
        start = time.perf_counter()
        try:
            if not parsed:
                payload = parse_body(payload, self.max_body_bytes)
            outputs = self.predictor.run(decode_request(payload))
        except InputError as exc:
            return self.refuse(exc)
        except Exception as exc:
            return self._failed(exc)
        return self._answer(outputs, start)
