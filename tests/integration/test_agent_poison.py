"""Poison messages through a real Mosquitto and a real agent process (issue 18, finding 1).

On main a ``reply_to`` holding ``\\u0001`` made the agent publish to a topic Mosquitto refuses as
malformed: the broker dropped the agent, redelivered the QoS 1 request at the reconnect, and the
agent flapped (41 disconnects in 8 s), answering no one, also after a restart. Each path a
message can take to the broker's refusal is tried here: the JSON ``reply_to`` of tensor JSON, of a
command and of OIP (beside the inputs and in ``parameters``), the MQTT 5 response topic, and an
answer over the broker's maximum packet size. The device must stay connected (no last will, one
connect), answer everyone else, count what it refused, and be quiet after a restart.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agent import Client, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import Mosquitto, SmallPacketMosquitto

X = [[0.5] * 8]
# What Mosquitto drops a publisher for (tried in test_topic_names_mosquitto_takes): each must
# be refused by the agent before it is sent.
BAD_CHARACTERS = ["\u0001", "\x7f", "\u0000", "\u0085", "\ufdd0", "\uffff", "\ud800"]


@pytest.fixture
def watch(broker: Mosquitto, topic_prefix: str) -> Iterator[DeviceWatch]:
    w = DeviceWatch(broker, topic_prefix, "dev-a")
    yield w
    w.close()


def _connects_after(watch: DeviceWatch, since: float) -> int:
    """The agent's own connect count, from a heartbeat sampled after ``since`` (unix time)."""
    beat = watch.wait(
        lambda rs: next(
            (r for r in reversed(rs) if r["kind"] == "heartbeat" and r["ts"] > since), None
        ),
        20,
    )
    return int(beat["data"]["connects"])


def _still_serving(client: Client, prefix: str) -> None:
    """Someone else's requests are answered: an inference and a ping."""
    answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}}, timeout=10)
    assert answer["ok"] is True and set(answer["outputs"]) == {"logits", "probs"}
    assert client.request(f"{prefix}/dev-a/cmd/ping", {}, timeout=10)["pong"] is True


def _poison(prefix: str, where: str, reply_to: str, request_id: str) -> tuple[str, dict[str, Any]]:
    if where == "infer":
        return f"{prefix}/dev-a/infer", {"id": request_id, "inputs": {"x": X}, "reply_to": reply_to}
    if where == "ping":
        return f"{prefix}/dev-a/cmd/ping", {"id": request_id, "reply_to": reply_to}
    oip = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}
    if where == "oip_parameters":
        params = {"reply_to": reply_to}
        return f"{prefix}/dev-a/infer", {"id": request_id, "inputs": [oip], "parameters": params}
    return f"{prefix}/dev-a/infer", {"id": request_id, "inputs": [oip], "reply_to": reply_to}


def _mosquitto_pub(broker: Mosquitto, topic: str, doc: dict[str, Any], qos: int = 1) -> None:
    """As a user would send it: the JSON escapes (``\\u0001``) as text."""
    text = json.dumps(doc)  # ensure_ascii: every bad character travels as an escape
    subprocess.run(
        ["mosquitto_pub", "-p", str(broker.port), "-q", str(qos), "-t", topic, "-m", text],
        check=True,
        timeout=20,
    )


@pytest.mark.parametrize("where", ["infer", "ping", "oip_parameters", "oip"])
def test_a_reply_to_the_broker_refuses_keeps_no_device_off_the_broker(
    where: str,
    agent_factory: Any,
    client: Client,
    broker: Mosquitto,
    pack_v1: Path,
    topic_prefix: str,
    watch: DeviceWatch,
) -> None:
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    started = time.time()
    ids = []
    for i, char in enumerate(BAD_CHARACTERS):
        ids.append(f"poison-{i}")
        topic, doc = _poison(topic_prefix, where, f"replies/x{char}y", ids[-1])
        _mosquitto_pub(broker, topic, doc, qos=1 + i % 2)  # QoS 2 is handled on PUBREL
    # Forwardable by the broker, and still no reply address: wildcards, the broker's own topics,
    # the device's command topic (a reply there would be read as a command), too long.
    for i, reply_to in enumerate(
        ["replies/+", "replies/#", "$SYS/x", f"{topic_prefix}/dev-a/cmd/ping", "r" * 70_000]
    ):
        ids.append(f"unusable-{i}")
        client.publish(*_poison(topic_prefix, where, reply_to, ids[-1]))
    _still_serving(client, topic_prefix)  # in order after every poison message: all handled
    unanswered = watch.wait(
        lambda rs: {e.get("id") for e in _events(rs, "unanswered")} >= set(ids) or None
    )
    assert unanswered
    assert {e["reason"] for e in watch.events("unanswered")} == {"reply_topic"}
    if where != "ping":  # an inference is counted by reason in the inference telemetry too
        watch.wait(lambda rs: watch.rejected("reply_topic") >= len(ids))
    assert _connects_after(watch, time.time()) == 1
    assert watch.offline() == 0, "the broker dropped the device (its last will was published)"
    assert "disconnected" not in agent.output()
    assert time.time() - started < 60

    # A restart: nothing is delivered again, nothing is dropped again.
    assert agent.stop() == 0
    watch.wait_offline(1)  # the clean stop's own offline status
    restarted = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    _still_serving(client, topic_prefix)
    assert _connects_after(watch, time.time()) == 1
    assert watch.offline() == 1  # only the clean stop's
    assert "disconnected" not in restarted.output()


def _events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r["data"] for r in records if r["kind"] == "event" and r["data"].get("event") == name]


def test_an_unusable_mqtt5_response_topic_is_answered_nowhere_and_the_request_not_run(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, watch: DeviceWatch
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    own_cmd = f"{topic_prefix}/dev-a/cmd/config"
    for i, response_topic in enumerate(["replies/+", "$SYS/x", own_cmd]):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = b"c"
        # A config whose reply would land on the device's own config topic: not run at all.
        client.publish(own_cmd, {"id": f"rt-{i}", "telemetry_interval": 5}, properties=props)
        client.publish(
            f"{topic_prefix}/dev-a/infer", {"id": f"rti-{i}", "inputs": {"x": X}}, properties=props
        )
    _still_serving(client, topic_prefix)
    watch.wait(lambda rs: len(_events(rs, "unanswered")) >= 6)
    watch.wait(lambda rs: watch.rejected("reply_topic") >= 3)
    assert watch.rejected("reply_topic") == 3 and len(watch.events("unanswered")) == 6
    assert not watch.events("config")  # no config command ran
    assert _connects_after(watch, time.time()) == 1 and watch.offline() == 0


def test_an_answer_over_the_brokers_packet_limit_is_refused_not_sent(
    tmp_path: Path, pack_v1: Path, keys: tuple[Path, Path], topic_prefix: str
) -> None:
    from tests.support.agent import AgentProcess

    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto").start()
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\ntelemetry_batch = 10\n")  # each batch well under the limit
    agent = AgentProcess(
        broker, tmp_path / "agent", keys[1], topic_prefix, pack=pack_v1,
        args=("--config", str(config)),
    ).start()  # fmt: skip
    client = Client(broker)
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    try:
        wait_online(client, topic_prefix, "dev-a")
        rows = [[0.25] * 8] * 256  # 8 KiB of request, about 20 KiB of answer
        for via in ("response_topic", "reply_to"):
            big = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": rows}}, via=via)
            assert big["ok"] is False and big["reason"] == "too_large", big
            assert "16384" in big["error"]
        _still_serving(client, topic_prefix)
        assert _connects_after(watch, time.time()) == 1 and watch.offline() == 0
        assert {e["reason"] for e in watch.wait(lambda rs: _events(rs, "unanswered"))} == {
            "too_large"
        }
    finally:
        watch.close()
        client.close()
        agent.stop()
        broker.stop()


def test_topic_names_mosquitto_takes_are_exactly_those_the_validator_passes(
    broker: Mosquitto,
) -> None:
    """Every refusal for characters is one Mosquitto drops a client for; every topic passed is
    one it takes (a client publishing each stays connected)."""
    import threading

    import paho.mqtt.client as mqtt
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cloud_sync.protocol import topic_name_problem

    connected = threading.Event()
    clients: list[mqtt.Client] = []

    def connect() -> mqtt.Client:
        """A new client: paho would send a dropped client's unacknowledged message again."""
        connected.clear()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        c.on_connect = lambda *a: connected.set()
        c.connect("127.0.0.1", broker.port, 30)
        while not connected.is_set():
            c.loop(0.05)
        clients[:] = [c]
        return c

    def drops(topic: str) -> bool:
        """Whether Mosquitto drops a client publishing to ``topic``."""
        c = clients[0]
        info = c.publish(topic, b"x", qos=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if info.is_published():
                    return False
            except RuntimeError:  # the connection is gone: the broker dropped it
                break
            if c.loop(0.05) != mqtt.MQTT_ERR_SUCCESS or not c.is_connected():
                break
        else:
            raise AssertionError(f"neither acknowledged nor dropped: {topic!r}")
        connect()
        return True

    connect()
    text = st.text(
        st.characters(codec="utf-8", exclude_characters="+#") | st.sampled_from(BAD_CHARACTERS),
        min_size=1,
        max_size=12,
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(topic=text)
    def check(topic: str) -> None:
        problem = topic_name_problem(topic)
        if problem is None:
            assert not drops(topic), topic
        elif not any(0xD800 <= ord(ch) <= 0xDFFF for ch in topic):  # paho cannot even send those
            assert drops(topic), (topic, problem)

    try:
        check()
    finally:
        clients[0].disconnect()
