"""The agent's local HTTP endpoint as the third review attacked it, with the agent in its own
process: slow clients were held 24 s with a thread each (finding 7), a body's end could be read
two ways (Transfer-Encoding beside Content-Length, the first of two Content-Lengths), and the OIP
metadata called every output FP32 of shape [] (finding 8). The metadata must be the manifest's,
the same on the agent, Lambda and ``bentoml serve``."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.integration.test_bento_serve import start_server, wait_ready
from tests.support.agent import Client, ModuleAgent
from tests.support.services import free_port, wait_for_port

pytestmark = pytest.mark.integration

GOOD = b'{"inputs": {"x": [[1, 2, 3, 4, 5, 6, 7, 8]]}}'
# What the manifest of ``topk_pack`` says, as OIP model metadata writes it.
TOPK_INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
TOPK_OUTPUTS = [
    {"name": "labels", "datatype": "INT64", "shape": [-1, 2]},
    {"name": "scores", "datatype": "FP16", "shape": [-1, 2]},
]


def _topk_model(path: Path) -> Path:
    """x float32 [batch, 4] -> its two largest: labels int64 [batch, 2], scores float16."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("TopK", ["x", "k"], ["values", "labels"], axis=1),
            helper.make_node("Cast", ["values"], ["scores"], to=TensorProto.FLOAT16),
        ],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT16, ["batch", 2]),
        ],
        [helper.make_tensor("k", TensorProto.INT64, [1], [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def topk_pack(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    import onnxruntime as ort

    from modelpack import Samples, create_pack

    work = tmp_path_factory.mktemp("topk")
    model = _topk_model(work / "topk.onnx")
    x = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outputs = dict(
        zip(["labels", "scores"], session.run(["labels", "scores"], {"x": x}), strict=True)
    )
    out = work / "pack"
    create_pack(model, out, name="topk", version=1, samples=Samples({"x": x}, outputs), key=keys[0])
    return out


def _agent(agent_factory: Any, pack: Path, tmp_path: Path, http: str = "") -> tuple[int, int]:
    """An agent with its endpoint on a free port: (port, pid)."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\nmetrics_port = {port}\n[agent.http]\n{http}")
    agent = agent_factory(pack=pack, args=("--config", str(config)))
    wait_for_port(port)
    return port, agent.process.pid


def _ask(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as reply:
        return json.loads(reply.read())


def _metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as reply:
        text = reply.read().decode()
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def test_fifty_slow_clients_hold_no_thread_of_the_agent_and_get_408_in_time(
    agent_factory: Any, client: Client, pack_v1: Path, tmp_path: Path
) -> None:
    """Each sends its head, then its body a byte every 0.5 s: the body has 2 s in all."""
    port, pid = _agent(
        agent_factory, pack_v1, tmp_path, "body_timeout_s = 2\nworkers = 2\nmax_connections = 64\n"
    )
    agent = psutil.Process(pid)
    assert _status(_ask(port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200
    threads = agent.num_threads()
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(GOOD)
    pending = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    answers, start, most = [], time.monotonic(), threads
    try:
        for sock in pending:
            sock.sendall(head)
        for i in range(len(GOOD) - 1):  # the whole body would take 22 s
            for sock in pending:
                sock.send(GOOD[i : i + 1])
            most = max(most, agent.num_threads())
            time.sleep(0.5)
            answered, _, _ = select.select(pending, [], [], 0)
            for sock in answered:
                sock.settimeout(10)
                answers.append(b"".join(iter(lambda s=sock: s.recv(65536), b"")))
                pending.remove(sock)
                sock.close()
            if not pending:
                break
        held = time.monotonic() - start
    finally:
        for sock in pending:
            sock.close()
    assert not pending and [_status(a) for a in answers] == [408] * 50
    assert all(json.loads(a.partition(b"\r\n\r\n")[2])["reason"] == "timeout" for a in answers)
    assert held < 2 + 4, held  # the body's limit, and never the client's pace
    # The pool's second worker and whatever else the agent starts meanwhile, never one each.
    assert most <= threads + 8, (threads, most)
    # Counted as the clients' refusals, not as errors of the model.
    assert _metric(port, 'edgebento_input_rejected_total{reason="timeout"}') == 50
    assert _metric(port, 'edgebento_requests_total{outcome="error"}') == 0


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: %d\r\nTransfer-Encoding: chunked" % len(GOOD),
        b"Transfer-Encoding: chunked\r\nContent-Length: %d" % len(GOOD),
        b"Content-Length: 2\r\nContent-Length: %d" % len(GOOD),
        b"Content-Length: %d\r\nContent-Length: %d" % (len(GOOD), len(GOOD)),
    ],
)
def test_a_body_whose_end_could_be_read_two_ways_is_a_400(
    module_agent: ModuleAgent, lengths: bytes
) -> None:
    answer = _ask(
        module_agent.port, b"POST /infer HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n\r\n" + GOOD
    )
    assert _status(answer) == 400, answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "invalid"


def test_the_agents_answers_write_float32_with_nine_digits(module_agent: ModuleAgent) -> None:
    """Issue 23: the agent wrote float64's 17 digits where the other targets write 9."""
    answer = _ask(
        module_agent.port,
        b"POST /infer HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(GOOD)
        + GOOD,
    )
    body = answer.partition(b"\r\n\r\n")[2].decode()
    numbers = re.findall(r"-?\d[\d.]*(?:e[-+]?\d+)?", body.partition('"model"')[0])
    digits = [len(n.split("e")[0].lstrip("-").replace(".", "").lstrip("0")) for n in numbers]
    assert len(numbers) == 6 and max(digits) <= 9, numbers
    probs = np.asarray(json.loads(body)["outputs"]["probs"], np.float32)
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5


def _lambda_documents(pack: Path, trust: Path) -> tuple[Any, Any]:
    """OIP model metadata and /metadata from the Lambda handler, in a process of its own (its
    environment is read once per process, as on AWS)."""
    script = (
        "import json, sys\n"
        "from bentos.lambda_handler import handler\n"
        "def get(path):\n"
        "    event = {'version': '2.0', 'routeKey': '$default', 'rawPath': path, 'headers': {},\n"
        "             'requestContext': {'http': {'method': 'GET', 'path': path}}}\n"
        "    return json.loads(handler(event, None)['body'])\n"
        "print(json.dumps([get('/v2/models/topk'), get('/metadata')]))\n"
    )
    env = {**os.environ, "EDGEBENTO_PACK": str(pack), "EDGEBENTO_TRUST": str(trust)}
    env.pop("EDGEBENTO_PACK_URL", None)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    oip, meta = json.loads(done.stdout.strip().splitlines()[-1])
    return oip, meta


@pytest.fixture(scope="module")
def bento_topk(
    topk_pack: Path, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("bento-topk")
    home = work / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    edgebento = Path(sys.executable).parent / "edgebento"
    done = subprocess.run(
        [str(edgebento), "bento", "import", str(topk_pack), "--pub", str(keys[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    server = start_server(home, "topk:v1", work / "serve.log")
    try:
        wait_ready(server)
        yield server.url
    finally:
        server.stop()


def _io(meta: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The inputs and outputs of a /metadata document, without what differs by target."""
    return meta["inputs"], meta["outputs"]


def test_metadata_gives_the_manifests_dtypes_and_shapes_on_every_target(
    agent_factory: Any,
    client: Client,
    topk_pack: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
    bento_topk: str,
) -> None:
    """Finding 8: the agent answered every output as FP32 with shape []."""
    port, _ = _agent(agent_factory, topk_pack, tmp_path)
    agent_oip = _get(port, "/v2/models/topk")
    assert agent_oip["inputs"] == TOPK_INPUTS and agent_oip["outputs"] == TOPK_OUTPUTS
    assert _get(port, "/v2/models/topk/versions/1")["outputs"] == TOPK_OUTPUTS
    agent_meta = _get(port, "/metadata")
    outputs = {o["name"]: (o["dtype"], o["shape"]) for o in agent_meta["outputs"]}
    assert outputs == {"labels": ("int64", ["batch", 2]), "scores": ("float16", ["batch", 2])}
    # The same documents from Lambda and from bentoml serve.
    lambda_oip, lambda_meta = _lambda_documents(topk_pack, keys[1])
    with urllib.request.urlopen(bento_topk + "/v2/models/topk", timeout=15) as reply:
        bento_oip = json.loads(reply.read())
    with urllib.request.urlopen(bento_topk + "/metadata", timeout=15) as reply:
        bento_meta = json.loads(reply.read())
    for oip in (lambda_oip, bento_oip):
        assert oip["inputs"] == TOPK_INPUTS and oip["outputs"] == TOPK_OUTPUTS
    for meta in (lambda_meta, bento_meta):
        assert _io(meta) == _io(agent_meta)
    # And an answer has the dtypes the metadata promised: integers stay integers.
    x = {"inputs": {"x": [[0.1, 0.9, 0.5, -1.0]]}}
    body = json.dumps(x).encode()
    answer = _ask(
        port,
        b"POST /infer HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    outputs = json.loads(answer.partition(b"\r\n\r\n")[2])["outputs"]
    assert outputs["labels"] == [[1, 2]] and outputs["scores"][0][0] == pytest.approx(0.9, 1e-3)
