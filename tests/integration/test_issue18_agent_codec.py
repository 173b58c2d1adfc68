"""Findings 2 and 3 of issue 18 on the agent, in its own process on a real Mosquitto: its local
HTTP endpoint and its MQTT inference share the codec that bentoml serve and Lambda use, so a
zero-size tensor of any shape costs nothing (b64 ``""`` with shape ``[1, 0, 2**40]`` was a 500
and ``[1, 0, 10**8]`` held 1.5 GB), and integers come back exactly (UINT64 ``2**64 - 1`` came
back as 0) or are refused naming the input, never converted with loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_agent_http_bounds import _agent, _metric
from tests.integration.test_agent_pipelines_bounds import _vm_hwm
from tests.support.agent import Client, wait_online
from tests.unit.bentos.test_issue18_lambda_bounds import _model

pytestmark = pytest.mark.integration

U64_EDGES = [0, 1, 2**53 + 1, 2**63, 2**64 - 1]


@pytest.fixture
def zero_pack(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    from modelpack import create_pack

    create_pack(_model(tmp_path / "z.onnx"), tmp_path / "pack", name="z", version=1, key=keys[0])
    return tmp_path / "pack"


def _tensor(shape: list[int], u: list[Any]) -> dict[str, Any]:
    return {"inputs": {"z": {"dtype": "float32", "shape": shape, "b64": ""}, "u": [u]}}


def test_zero_size_tensors_and_exact_integers_on_the_agents_http_and_mqtt(
    agent_factory: Any,
    client: Client,
    zero_pack: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    port, pid = _agent(agent_factory, zero_pack, tmp_path)
    wait_online(client, topic_prefix, "dev-a")
    infer = f"{topic_prefix}/dev-a/infer"
    url = f"http://127.0.0.1:{port}/infer"
    warm = client.request(infer, _tensor([1, 1, 0], [0]), timeout=30)
    assert warm["ok"] is True, warm
    before = _vm_hwm(pid)
    for shape in ([1, 0, 100_000_000], [1, 0, 2**40]):
        over_mqtt = client.request(infer, _tensor(shape, U64_EDGES), timeout=30)
        assert over_mqtt["ok"] is True, over_mqtt
        assert over_mqtt["outputs"]["z_out"] == [[]]
        assert over_mqtt["outputs"]["u_out"] == [U64_EDGES]
        over_http = httpx.post(url, json=_tensor(shape, U64_EDGES), timeout=30)
        assert over_http.status_code == 200, over_http.text
        assert over_http.json()["outputs"] == {"z_out": [[]], "u_out": [U64_EDGES]}
    grown = _vm_hwm(pid) - before
    assert grown < 64 << 20, f"peak RSS grew {grown >> 20} MB for zero-size tensors"
    # Nested lists that would be real text are refused before anything runs.
    wide = client.request(infer, _tensor([1, 10**8, 0], [0]), timeout=30)
    assert wide["ok"] is False and wide["reason"] == "too_large", wide
    # A number uint64 would change is the client's, naming the input; never a counted error.
    for value in (2**64, -1, 0.5):
        refused = client.request(infer, _tensor([1, 0, 0], [0, value]), timeout=30)
        assert refused["ok"] is False and refused["reason"] == "dtype", refused
        assert "'u'" in refused["error"]
        answer = httpx.post(url, content=json.dumps(_tensor([1, 0, 0], [0, value])), timeout=30)
        assert answer.status_code == 400 and "'u'" in answer.json()["error"], answer.text
    assert _metric(port, 'edgebento_requests_total{outcome="error"}') == 0
    assert _metric(port, 'edgebento_requests_total{outcome="rejected"}') == 7
