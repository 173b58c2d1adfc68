"""Perceive, decide, act: sensor readings on an input topic, the model, results on an output topic.

A reading is tensor JSON (``{"inputs": {...}}``, with an optional ``id`` echoed in its result),
a bare list of numbers, or ``{"values": [...]}`` for a model with one input. With ``labels`` the
result names the top class and its score, and with ``threshold`` it is published only when the
score reaches it (an action, not a stream).

Readings take the infer topic's path: the same bounded queue, the same ``max_payload_bytes``
(a reading over it is dropped before it is queued or parsed), the same deadline counted from
its arrival, and the same reasons, counted in the serving metrics and in ``refused``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from edge_agent.config import PipelineConfig
from edge_agent.inference import Answer, InferenceService
from modelpack.codec import dumps, parse_body
from modelpack.errors import EdgebentoError, InputError, OverloadError

log = logging.getLogger(__name__)

NotSent = Callable[[str], None]  # told why, when a result published is never sent after all
Publish = Callable[[str, bytes, NotSent], None]
Record = Callable[[str, dict[str, Any]], None]  # an event for the telemetry outbox
MAX_ID_CHARS = 128


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        inference: InferenceService,
        publish: Publish,
        record: Record | None = None,
    ) -> None:
        self.config, self.inference, self.publish = config, inference, publish
        self.record = record
        self.handled = self.published = self.failed = 0
        self.unsent = 0  # published, then taken out of the session's queue (never sent)
        self.refused: dict[str, int] = {}  # readings not run, by reason

    def _refuse(self, exc: EdgebentoError, counted: bool = False) -> None:
        reason = getattr(exc, "reason", "invalid")  # busy ones by cause: queue_full, deadline
        if not counted:
            self.inference.core.count_error(exc)
        count = self.refused[reason] = self.refused.get(reason, 0) + 1
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood cannot flood the log
            log.warning(
                "pipeline %s: reading refused (%d so far): %s", self.config.name, count, exc
            )

    def oversized(self, payload: bytes, limit: int) -> bool:
        """Refuse (counted) a reading over ``limit`` bytes: nothing of it is read."""
        if len(payload) <= limit:
            return False
        self.handled += 1
        self._refuse(
            InputError(f"a reading of {len(payload)} bytes; the cap is {limit}", "too_large")
        )
        return True

    def _request(self, reading: Any) -> dict[str, Any]:
        if isinstance(reading, dict) and "inputs" in reading:
            return {"inputs": reading["inputs"]}
        values = reading.get("values") if isinstance(reading, dict) else reading
        if not isinstance(values, list):
            raise InputError(
                'a reading is {"inputs": {...}}, {"values": [...]} or a list of numbers',
                reason="invalid",
            )
        predictor = self.inference.predictor
        names = list(predictor.inputs) if predictor is not None else []
        name = self.config.input or (names[0] if len(names) == 1 else None)
        if name is None:
            raise InputError(
                "the model has several inputs: set the pipeline's input", reason="invalid"
            )
        batch = values if values and isinstance(values[0], list) else [values]
        return {"inputs": {name: batch}}

    def _decide(self, reading: Any, answer: Answer) -> dict[str, Any] | None:
        doc = answer.doc
        result: dict[str, Any] = {
            "pipeline": self.config.name,
            "model": doc["model"],
            "outputs": doc["outputs"],
            "latency_ms": doc["latency_ms"],  # since the reading arrived
            "ts": time.time(),
        }
        reading_id = reading.get("id") if isinstance(reading, dict) else None
        if isinstance(reading_id, str) and len(reading_id) <= MAX_ID_CHARS:
            result["id"] = reading_id
        if not self.config.labels:
            return result
        outputs = answer.outputs
        chosen = outputs["probs"] if "probs" in outputs else list(outputs.values())[-1]
        scores = np.asarray(chosen, dtype=np.float64)
        top = scores.reshape(-1, scores.shape[-1])[0]
        index = int(np.argmax(top))
        result["label"] = (
            self.config.labels[index] if index < len(self.config.labels) else str(index)
        )
        result["score"] = float(top[index])
        if self.config.threshold is not None and result["score"] < self.config.threshold:
            return None
        return result

    def handle(self, payload: bytes, limit: int, arrived: float, full: bool) -> None:
        """One reading, from the queue (``full``: it found the queue full)."""
        self.handled += 1
        late = self.inference.busy() if full else self.inference.late(arrived)
        if late is not None:  # counted by the service
            self._refuse(late, counted=True)
            return
        try:
            reading = parse_body(payload, replace(self.inference.core.limits, max_body_bytes=limit))
            request = self._request(reading)
        except InputError as exc:
            self._refuse(exc)
            return
        try:
            answer = self.inference.run(request, None, arrived)
        except (InputError, OverloadError) as exc:  # counted by the core
            self._refuse(exc, counted=True)
            return
        except EdgebentoError as exc:
            self.failed += 1
            log.warning("pipeline %s: reading not answered: %s", self.config.name, exc)
            return
        result = self._decide(reading, answer)
        if result is None:
            return
        try:
            self.publish(self.config.output_topic, dumps(result), self._not_sent)
        except EdgebentoError as exc:  # too big for the broker: never sent
            self.failed += 1
            log.warning("pipeline %s: result not published: %s", self.config.name, exc)
            return
        self.published += 1

    def _not_sent(self, why: str) -> None:
        """A result published, then taken out of the session's queue: an MQTT 3.1.1 broker
        closed the connection for it (over its packet limit, ``edge_agent.packet_limit``).
        Called on the session's thread; counted apart from ``published``, said in the log and
        in an ``unpublished`` event."""
        self.unsent += 1
        log.warning("pipeline %s: result not published: %s", self.config.name, why)
        if self.record is not None:
            event = {"event": "unpublished", "pipeline": self.config.name,
                     "topic": self.config.output_topic, "reason": "too_large", "error": why}  # fmt: skip
            self.record("event", event)
