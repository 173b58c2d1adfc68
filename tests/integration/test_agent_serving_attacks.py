"""The agent's inference attacked as the serving review found it broke, with the agent in its
own process on a real Mosquitto: its local endpoint answered HEAD/PUT/DELETE with 501 and
dropped the connection on a 5000-digit Content-Length; over MQTT a 5000-digit JSON integer
escaped the parser and an OIP refusal carried no ``ok: false``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.test_agent_serving import _raw
from tests.support.agent import Client, wait_for, wait_online
from tests.support.services import free_port, wait_for_port

pytestmark = pytest.mark.integration

GOOD = b'{"inputs": {"x": [[1, 2, 3, 4, 5, 6, 7, 8]]}}'


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _request(method: str, path: str, length: str | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_the_local_endpoint_answers_every_method_and_length_with_a_4xx(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\nmetrics_port = {port}\n")
    agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_for_port(port)
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        answer = _raw(port, _request(method, "/infer", "0"))
        assert _status(answer) == 405, answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "method"
    head = _raw(port, _request("HEAD", "/metadata"))
    assert _status(head) == 200 and head.endswith(b"\r\n\r\n")  # no body after the headers
    assert _status(_raw(port, _request("HEAD", "/infer"))) == 405
    # int() of 5000 digits raised inside the handler: the connection was dropped unanswered.
    huge = _raw(port, _request("POST", "/infer", "9" * 5000), GOOD)
    assert _status(huge) == 413 and json.loads(huge.partition(b"\r\n\r\n")[2])["reason"]
    arabic = "\u0668".encode()  # a digit to str.isdigit, not to HTTP
    answer = _raw(
        port,
        _request("POST", "/infer").replace(
            b"\r\n\r\n", b"\r\nContent-Length: " + arabic + b"\r\n\r\n"
        ),
    )
    assert _status(answer) == 400
    digits = b"1" * 5000
    big_int = b'{"inputs": {"x": [[' + digits + b", 2, 3, 4, 5, 6, 7, 8]]}}"
    answer = _raw(port, _request("POST", "/infer", str(len(big_int)), big_int))
    assert _status(answer) == 400, answer[:300]
    ok = _raw(port, _request("POST", "/infer", str(len(GOOD)), GOOD))
    assert _status(ok) == 200


def _props(client: Client) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = client.reply_topic
    props.CorrelationData = uuid.uuid4().bytes
    return props


def test_hostile_mqtt_payloads_each_get_ok_false_with_a_reason(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    topic = f"{topic_prefix}/dev-a/infer"
    replies = client.queues[client.reply_topic]
    huge = b'{"id": "huge", "inputs": {"x": [[' + b"1" * 5000 + b"]]}}"
    for payload, reason in (
        (huge, "invalid_json"),
        (b"[1, 2]", "invalid"),
        (b"\xff", "invalid_json"),
    ):
        client.publish(topic, payload, properties=_props(client))
        reply = wait_for(replies, lambda d, r=reason: d.get("reason") == r)
        assert reply["ok"] is False and reply["error"]
    x = [[0.5] * 8]
    oip: dict[str, Any] = {
        "id": "o-bad",
        "inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", "data": x}],
    }
    client.publish(topic, oip, properties=_props(client))
    refused = wait_for(replies, lambda d: d.get("id") == "o-bad")
    assert refused["ok"] is False and refused["reason"] == "dtype"
    flag = {
        "id": "o-flag",
        "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x}],
        "parameters": {"binary_data_output": "yes"},
    }
    client.publish(topic, flag, properties=_props(client))
    assert wait_for(replies, lambda d: d.get("id") == "o-flag")["reason"] == "invalid"
    # binary_data asked for over MQTT, which has no binary split: answered in JSON.
    binary = {
        "id": "o-bin",
        "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x}],
        "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
    }
    client.publish(topic, binary, properties=_props(client))
    answer = wait_for(replies, lambda d: d.get("id") == "o-bin")
    assert answer["ok"] is True
    (probs,) = answer["outputs"]
    assert probs["shape"] == [1, 3] and len(probs["data"]) == 3
