"""What a hostile client sends is named in the agent's replies and telemetry, never copied whole:
through a real agent process and Mosquitto.

Before, a command with a 10 KiB unknown field name was answered with a 30 KiB reply (the name
quoted, each 2-byte character written as a 6-byte JSON escape) and recorded as a 30 KiB
``bad_request`` event; an unknown command name came back whole, twice; a tensor's dtype or an
OIP datatype came back whole. Each reply and event here was over its bound then (the command
name's reply by its ``command`` field: a topic level is at most 128 characters).
"""

from __future__ import annotations

import json
import queue
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agent import Client, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import Mosquitto

pytestmark = pytest.mark.integration

HUGE = "é" * 5000  # 10 KiB of UTF-8, 30 KiB as JSON escapes
REPLY_BOUND = 2048  # bytes of a refusal, as the agent writes it
EVENT_BOUND = 4096  # bytes of a telemetry record, as json.dumps writes it (escapes included)
X = [[0.5] * 8]


def _ask(client: Client, topic: str, payload: bytes, replies: queue.Queue[Any]) -> bytes:
    """Publish ``payload`` with an MQTT 5 response topic; the reply's bytes as sent."""
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = client.reply_topic
    props.CorrelationData = correlation
    client.publish(topic, payload, properties=props)
    while True:
        msg: mqtt.MQTTMessage = replies.get(timeout=30)
        if msg.properties.CorrelationData == correlation:
            return bytes(msg.payload)


def test_a_hostile_requests_text_is_named_in_small_replies_and_events(
    agent_factory: Any, broker: Mosquitto, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    try:
        agent_factory(pack=pack_v1)
        wait_online(client, topic_prefix, "dev-a")
        replies = client.queues[client.reply_topic]
        device = f"{topic_prefix}/dev-a"

        b64 = {"id": "b1", "inputs": {"x": {"dtype": HUGE, "shape": [1, 8], "b64": "AAAA"}}}
        oip = {"id": "o1", "inputs": [{"name": "x", "datatype": HUGE, "shape": [1, 8],
                                       "data": X[0]}]}  # fmt: skip
        hostile = {
            "field": (f"{device}/cmd/ping", {"id": "f1", HUGE: 1}),
            "command": (f"{device}/cmd/{HUGE[:128]}", {"id": "c1"}),  # 128: the longest level
            "dtype": (f"{device}/infer", b64),
            "datatype": (f"{device}/infer", oip),
        }
        sent = {name: _ask(client, topic, json.dumps(doc).encode(), replies)
                for name, (topic, doc) in hostile.items()}  # fmt: skip
        sizes = {name: len(body) for name, body in sent.items()}
        assert max(sizes.values()) <= REPLY_BOUND, sizes
        # Each still says what was wrong, and where, for a client that means well.
        said = {name: json.loads(body) for name, body in sent.items()}
        field = said["field"]["error"]
        assert said["field"]["ok"] is False and "Extra inputs are not permitted" in field, field
        assert field.startswith("not a request (command ping): éé") and "…(+" in field, field
        assert "unknown command 'ééé" in said["command"]["error"], said["command"]
        assert "known: ping, deploy" in said["command"]["error"]
        assert len(said["command"]["command"]) <= 64 and "…(+" in said["command"]["command"]
        assert "the model takes float32, got 'ééé" in said["dtype"]["error"], said["dtype"]
        assert "is not one of" in said["datatype"]["error"], said["datatype"]
        assert said["dtype"]["reason"] == said["datatype"]["reason"] == "dtype"

        bad = watch.wait(lambda rs: _bad_requests(rs))
        records = {len(json.dumps(r)) for r in bad}
        assert max(records) <= EVENT_BOUND, records
        assert "Extra inputs are not permitted" in bad[0]["data"]["error"]
        # ... and the device serves on.
        answer = client.request(f"{device}/infer", {"inputs": {"x": X}})
        assert answer["ok"] is True
    finally:
        watch.close()


def _bad_requests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "event" and r["data"]["event"] == "bad_request"]
