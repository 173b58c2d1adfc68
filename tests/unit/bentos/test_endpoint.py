from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from bentos.endpoint import ModelEndpoint
from modelpack import Pack
from modelpack.metrics import InferenceMetrics


@pytest.fixture
def endpoint(mlp_pack: Pack) -> tuple[ModelEndpoint, CollectorRegistry]:
    registry = CollectorRegistry()
    return ModelEndpoint(
        mlp_pack, metrics=InferenceMetrics(registry=registry), max_body_bytes=4096
    ), registry


ROW = [0.5] * 8


@pytest.mark.parametrize(
    ("body", "status", "reason", "says"),
    [
        (b"", 400, "empty_body", "empty"),
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 400, "invalid", '{"inputs"'),
        (json.dumps({"inputs": {"y": [ROW]}}).encode(), 400, "unknown_input", "'y'"),
        (json.dumps({"inputs": {}}).encode(), 400, "missing_input", "'x'"),
        (json.dumps({"inputs": {"x": [ROW[:3]]}}).encode(), 400, "shape", "dim 1 must be 8"),
        (json.dumps({"inputs": {"x": [["a"] * 8]}}).encode(), 400, "dtype", "string"),
        (json.dumps({"inputs": {"x": "abc"}}).encode(), 400, "dtype", "string"),
        (json.dumps({"inputs": {"x": [ROW, ROW[:2]]}}).encode(), 400, "shape", "unequal"),
        (b'{"inputs": {"x": [' + b"0.5," * 2000 + b"0.5]}}", 413, "too_large", "cap"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason(
    endpoint: tuple[ModelEndpoint, CollectorRegistry],
    body: bytes,
    status: int,
    reason: str,
    says: str,
) -> None:
    ep, registry = endpoint
    answer = asyncio.run(ep.predict(body))
    assert answer.status == status
    assert answer.body["reason"] == reason
    assert says in answer.body["error"]
    assert registry.get_sample_value("edgebento_input_rejected_total", {"reason": reason}) == 1
    assert registry.get_sample_value("edgebento_requests_total", {"outcome": "rejected"}) == 1


def test_an_answer_carries_outputs_model_and_latency(
    endpoint: tuple[ModelEndpoint, CollectorRegistry], mlp_pack: Pack
) -> None:
    ep, registry = endpoint
    samples = mlp_pack.samples
    assert samples is not None
    body = json.dumps({"inputs": {"x": samples.inputs["x"].tolist()}}).encode()
    answer = asyncio.run(ep.predict(body))
    assert answer.status == 200
    assert answer.body["model"] == {"name": "tiny", "version": 1}
    assert answer.body["latency_ms"] >= 0
    np.testing.assert_allclose(answer.body["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5)
    assert registry.get_sample_value("edgebento_requests_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("edgebento_inference_seconds_count") == 1
    assert registry.get_sample_value("edgebento_model_info", {"name": "tiny", "version": "1"}) == 1


def test_metadata_has_the_manifest_and_io_signature(
    endpoint: tuple[ModelEndpoint, CollectorRegistry],
) -> None:
    meta = endpoint[0].metadata()
    assert meta["model"] == {"name": "tiny", "version": 1}
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probs"}
    assert meta["batching"] is True
    assert meta["manifest"]["name"] == "tiny"


def test_pathological_bodies_are_4xx_never_500(
    endpoint: tuple[ModelEndpoint, CollectorRegistry],
) -> None:
    ep, _ = endpoint
    for body in (
        b"[" * 3000,  # nested past the JSON parser's recursion limit
        b"\xff\xfe",
        json.dumps({"inputs": {"x": [[10**30] * 8]}}).encode(),
        json.dumps({"inputs": {"x": [[None] * 8]}}).encode(),
        json.dumps({"inputs": {"x": {"dtype": "float32", "shape": [1, 8], "b64": 123}}}).encode(),
        json.dumps(
            {"inputs": {"x": {"dtype": "float32", "shape": [10**12, 8], "b64": ""}}}
        ).encode(),
    ):
        answer = asyncio.run(ep.predict(body))
        assert 400 <= answer.status < 500, (body[:40], answer.body)


def test_non_finite_outputs_are_answered_as_null(
    endpoint: tuple[ModelEndpoint, CollectorRegistry],
) -> None:
    ep, _ = endpoint
    answer = asyncio.run(ep.predict(b'{"inputs": {"x": [[1e999, 0, 0, 0, 0, 0, 0, 0]]}}'))
    assert answer.status == 200
    json.dumps(answer.body, allow_nan=False)  # strict JSON, as Starlette renders it
    assert None in answer.body["outputs"]["probs"][0]
