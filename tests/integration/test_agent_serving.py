"""The agent's inference through the serving core, against a real Mosquitto with the agent in
its own process: OIP over MQTT, the payload cap before parsing, the bounded queue (``busy``),
absurd shapes, and the local HTTP endpoint's Content-Length handling."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agent import Client, ModuleAgent, wait_for, wait_online

pytestmark = pytest.mark.integration


def _props(client: Client) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = client.reply_topic
    props.CorrelationData = uuid.uuid4().bytes
    return props


def _oip(x: np.ndarray, request_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "probs"}],
    }


def test_oip_over_mqtt_is_answered_in_oip_form(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    topic = f"{topic_prefix}/dev-a/infer"
    client.publish(topic, _oip(x, "oip-1"), properties=_props(client))
    reply = wait_for(client.queues[client.reply_topic], lambda d: d.get("id") == "oip-1")
    assert reply["model_name"] == "tiny" and reply["model_version"] == "1"
    (probs,) = reply["outputs"]
    assert probs["name"] == "probs" and probs["shape"] == [2, 3]
    np.testing.assert_allclose(np.sum(np.reshape(probs["data"], (2, 3)), axis=1), 1, rtol=1e-5)
    # An OIP error is OIP-shaped too, with the same reason as every target.
    bad = _oip(np.ones((2, 5), np.float32), "oip-2")
    client.publish(topic, bad, properties=_props(client))
    refused = wait_for(client.queues[client.reply_topic], lambda d: d.get("id") == "oip-2")
    assert refused["reason"] == "shape" and refused["error"]
    # MQTT 3.1.1 clients name their reply topic in the request.
    old = {**_oip(x, "oip-3"), "reply_to": client.reply_topic}
    client.publish(topic, old)
    assert wait_for(client.queues[client.reply_topic], lambda d: d.get("id") == "oip-3")["outputs"]


def test_a_payload_over_max_payload_bytes_is_refused_before_parsing(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    """An 8 MiB request was accepted with a 1 MiB limit."""
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    rows = [[0.5] * 8] * 200_000  # over 8 MiB of JSON
    payload = json.dumps({"id": "big", "inputs": {"x": rows}}).encode()
    assert len(payload) > 8 << 20
    client.publish(f"{topic_prefix}/dev-a/infer", payload, properties=_props(client))
    reply = wait_for(client.queues[client.reply_topic], lambda d: d.get("reason") == "too_large")
    assert reply["ok"] is False and "cap is 1048576" in reply["error"]
    assert client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [[0.1] * 8]}})["ok"]


@pytest.mark.parametrize("shape", [[2**62, 8], [2**64, 8], [-1, 8]])
def test_absurd_b64_shapes_over_mqtt_get_a_reply(
    module_agent: ModuleAgent, client: Client, shape: list[int]
) -> None:
    """Before, the same request got no reply at all."""
    prefix = module_agent.prefix
    wait_online(client, prefix, "dev-a")
    tensor = {"dtype": "float32", "shape": shape, "b64": base64.b64encode(b"\0" * 32).decode()}
    reply = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": tensor}})
    assert reply["ok"] is False and reply["reason"] in ("too_large", "shape")


def test_a_burst_past_the_queue_is_answered_busy_and_nothing_is_lost(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\ninference_workers = 1\n")
    agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    rows = json.dumps([[0.3] * 8] * 200)  # enough work per request for a queue to form
    ids = [f"burst-{i}" for i in range(400)]
    for request_id in ids:
        payload = f'{{"id": "{request_id}", "reply_to": "{client.reply_topic}", "inputs": {{"x": {rows}}}}}'
        client.client.publish(f"{topic_prefix}/dev-a/infer", payload.encode(), qos=1)
    replies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    q = client.queues[client.reply_topic]
    while len(replies) < len(ids) and time.monotonic() < deadline:
        body = json.loads(q.get(timeout=30).payload)
        replies[body["id"]] = body
    assert set(replies) == set(ids)  # every request answered
    busy = [r for r in replies.values() if not r["ok"]]
    assert busy and all(r["reason"] == "busy" for r in busy)
    assert {r["cause"] for r in busy} <= {"queue_full", "deadline"}
    assert any(r["ok"] for r in replies.values())


def _raw(port: int, head: bytes, body: bytes = b"", wait: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _post_head(length: str | None) -> bytes:
    lines = [b"POST /infer HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json"]
    if length is not None:
        lines.append(b"Content-Length: " + length.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("length", "status", "reason"),
    [
        ("-1", 400, "invalid"),
        ("abc", 400, "invalid"),
        ("1e3", 400, "invalid"),
        ("99999999999", 413, "too_large"),
        (None, 411, "length_required"),
    ],
)
def test_the_local_endpoint_answers_every_bad_content_length_with_a_4xx(
    module_agent: ModuleAgent, length: str | None, status: int, reason: str
) -> None:
    port = module_agent.port
    answer = _raw(port, _post_head(length), b'{"inputs": {"x": [[1, 2, 3, 4, 5, 6, 7, 8]]}}')
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.0 {status}".encode()) or head.startswith(
        f"HTTP/1.1 {status}".encode()
    ), answer[:200]
    assert json.loads(body)["reason"] == reason
    # OIP on the same endpoint, and the server still answers after the bad request.
    x = [[0.2] * 8]
    oip = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x}]}
    ).encode()
    head = (
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(oip)
    )
    answer = _raw(port, head, oip)
    assert b" 200 " in answer.split(b"\r\n", 1)[0]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["model_name"] == "tiny"
