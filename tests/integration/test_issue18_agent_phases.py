"""The agent's HTTP endpoint, in its own process, on the two bounds of issue 18 that only the
in-process endpoint tests had shown: a run not finished within ``run_timeout_s`` is a 504
``run_timeout``, counted as an error with its reason (never as the client's), and the agent
answers on; and connections past ``max_connections`` are turned away with a 503 ``queue_full``,
counted, with no thread started for them, and served again once places are free. (The 408 of a
body not received in time is test_agent_http_bounds.py's.)"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.integration.test_agent_http_bounds import GOOD, _agent, _ask, _metric, _status
from tests.support import models
from tests.support.agent import Client, wait_online
from tests.support.serving_models import _save as save_model

pytestmark = pytest.mark.integration

WIDTH, DEPTH = 256, 512
ROWS = 256  # the agent's batch cap: 17 GFLOP, a third of a second or more on one core


def _row_cost_model(path: Path) -> Path:
    """x[batch, 256] through 512 MatMul+Tanh layers that share one weight (a 256 kB model whose
    cost grows with its rows: about 3 ms a row), summed to y[batch, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes, last = [], "x"
    for i in range(DEPTH):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        last = f"t{i}"
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes.append(helper.make_node("ReduceSum", [last, "axes"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "shared_row_cost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w"), axes],
    )
    return save_model(graph, path)


@pytest.fixture
def row_cost_pack(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    from modelpack import Samples, create_pack

    model = _row_cost_model(tmp_path / "row_cost.onnx")
    inputs, outputs = models.golden_samples(model, n=1, n_in=WIDTH)  # one cheap row
    out = tmp_path / "row-cost-pack"
    create_pack(model, out, name="rows", version=1, samples=Samples(inputs, outputs), key=keys[0])
    return out


def _rows_body(rows: int) -> bytes:
    b64 = base64.b64encode(np.full((rows, WIDTH), 0.25, np.float32).tobytes()).decode()
    tensor = {"dtype": "float32", "shape": [rows, WIDTH], "b64": b64}
    return json.dumps({"inputs": {"x": tensor}}).encode()


def _post(body: bytes) -> bytes:
    return (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body


def test_a_run_past_its_limit_is_a_504_counted_as_an_error_and_the_agent_answers_on(
    agent_factory: Any, client: Client, row_cost_pack: Path, tmp_path: Path, topic_prefix: str
) -> None:
    # 50 ms for the run: the 256-row request takes several times that on an idle core.
    port, _ = _agent(agent_factory, row_cost_pack, tmp_path, "run_timeout_s = 0.05\n")
    wait_online(client, topic_prefix, "dev-a")
    answer = _ask(port, _post(_rows_body(ROWS)))
    assert _status(answer) == 504, answer[:300]
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert doc["reason"] == "run_timeout" and "0.05" in doc["error"], doc
    # The server's fault, with its reason: in the error rate, not in the client's refusals.
    assert _metric(port, 'edgebento_request_errors_total{reason="run_timeout"}') == 1
    assert _metric(port, 'edgebento_requests_total{outcome="error"}') == 1
    assert _metric(port, 'edgebento_requests_total{outcome="rejected"}') == 0
    # The agent answers on (over MQTT, which has no run limit of its own).
    x = {"dtype": "float32", "shape": [1, WIDTH], "b64": _b64_row()}
    reply = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": x}}, timeout=30)
    assert reply["ok"] is True and len(reply["outputs"]["y"]) == 1, reply


def _b64_row() -> str:
    return base64.b64encode(np.full((1, WIDTH), 0.25, np.float32).tobytes()).decode()


def test_connections_past_the_cap_get_a_503_counted_and_no_thread(
    agent_factory: Any, client: Client, pack_v1: Path, tmp_path: Path
) -> None:
    port, pid = _agent(agent_factory, pack_v1, tmp_path, "max_connections = 4\nworkers = 2\n")
    agent = psutil.Process(pid)
    good = _post(GOOD)
    assert _status(_ask(port, good)) == 200
    threads = agent.num_threads()
    # Four connections that send nothing hold the four places (first come, first served).
    idle = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(4)]
    try:
        refused = [_ask(port, good) for _ in range(3)]
        assert [_status(a) for a in refused] == [503] * 3, [a[:200] for a in refused]
        for answer in refused:
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "queue_full"
        assert agent.num_threads() <= threads + 2  # the pool's second worker at most
    finally:
        for sock in idle:
            sock.close()
    # Served again once the endpoint has read the idle connections' ends (until then, a 503).
    deadline, more = time.monotonic() + 30, 0
    while _status(answer := _ask(port, good)) == 503:
        assert time.monotonic() < deadline, answer[:200]
        more += 1
        time.sleep(0.05)
    assert _status(answer) == 200, answer[:200]
    # Each refusal counted as an overload (read now: /metrics needs a place too).
    assert _metric(port, 'edgebento_overload_rejected_total{reason="queue_full"}') == 3 + more
    assert _metric(port, 'edgebento_requests_total{outcome="error"}') == 0
