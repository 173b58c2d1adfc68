"""Perceive, decide, act: sensor readings on an input topic, the model, results on an output topic.

A reading is tensor JSON (``{"inputs": {...}}``), a bare list of numbers, or ``{"values": [...]}``
for a model with one input. With ``labels`` the result names the top class and its score, and
with ``threshold`` it is published only when the score reaches it (an action, not a stream).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.config import PipelineConfig
from edge_agent.inference import InferenceService
from modelpack.errors import EdgebentoError, InputError

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]


class Pipeline:
    def __init__(
        self, config: PipelineConfig, inference: InferenceService, publish: Publish
    ) -> None:
        self.config, self.inference, self.publish = config, inference, publish
        self.handled = self.published = self.failed = 0

    def _request(self, reading: Any) -> dict[str, Any]:
        if isinstance(reading, dict) and "inputs" in reading:
            return reading
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

    def _decide(self, answer: dict[str, Any]) -> dict[str, Any] | None:
        result: dict[str, Any] = {
            "pipeline": self.config.name,
            "model": answer["model"],
            "outputs": answer["outputs"],
            "latency_ms": answer["latency_ms"],
            "ts": time.time(),
        }
        if not self.config.labels:
            return result
        outputs = answer["outputs"]
        scores = np.asarray(outputs.get("probs", list(outputs.values())[-1]), dtype=np.float64)
        top = scores.reshape(-1, scores.shape[-1])[0]
        index = int(np.argmax(top))
        result["label"] = (
            self.config.labels[index] if index < len(self.config.labels) else str(index)
        )
        result["score"] = float(top[index])
        if self.config.threshold is not None and result["score"] < self.config.threshold:
            return None
        return result

    def handle(self, payload: bytes) -> None:
        self.handled += 1
        try:
            reading = json.loads(payload)
            result = self._decide(self.inference.infer(self._request(reading)))
        except (ValueError, EdgebentoError) as exc:
            self.failed += 1
            log.warning("pipeline %s: reading refused: %s", self.config.name, exc)
            return
        if result is not None:
            self.published += 1
            self.publish(self.config.output_topic, json.dumps(result).encode())
