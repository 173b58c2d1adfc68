"""The agent's last will against a broker's packet limit, through a real Mosquitto
(``max_packet_size``) and a real agent process killed -9.

paho sends the will inside CONNECT, and Mosquitto closes the connection of a client whose
CONNECT is over its limit, before any CONNACK. The will used to be the whole status (64 groups
make it about 5 KB here): on such a broker the agent never connected, every test here timed out
waiting for its first answer. Now the will is bounded (``edge_agent.last_will``), and cut to
fit the CONNECT into a limit the agent knows.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent.last_will import WILL_BYTES, connect_bytes
from tests.support.agent import AgentProcess, Client
from tests.support.services import SmallPacketMosquitto

GROUPS = [f"line-{n:02d}-" + "g" * 64 for n in range(64)]  # 64 groups: a status of ~5 KB
X = [[0.5] * 8]


@pytest.fixture
def tight_broker(tmp_path: Path) -> Iterator[SmallPacketMosquitto]:
    """A broker that closes the connection of a client sending a packet over 1 KiB, CONNECT
    included (the smallest limit ``max_packet_bytes`` can say)."""
    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto", max_packet=1024).start()
    yield broker
    broker.stop()


def _start(
    agent_factory: Any, broker: SmallPacketMosquitto, pack: Path, tmp_path: Path, *extra: str
) -> AgentProcess:
    groups = [arg for group in GROUPS for arg in ("--group", group)]
    return agent_factory(broker=broker, pack=pack, args=(*groups, *extra))  # type: ignore[no-any-return]


def _serving(
    client: Client, prefix: str, agent: AgentProcess, telemetry: queue.Queue[mqtt.MQTTMessage]
) -> None:
    """The agent is connected, and answers a request. Its status is over the limit (never
    published, the usual sign): its first telemetry says it is connected, and subscribed (it
    subscribes before it publishes). A wide wait: it starts on a loaded machine."""
    try:
        telemetry.get(timeout=90)
    except queue.Empty:
        log = agent.output()[-3000:]
        raise AssertionError(f"the agent never connected; its log:\n{log}") from None
    answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}}, timeout=30)
    assert answer["ok"] is True and set(answer["outputs"]) == {"logits", "probs"}


def _will(statuses: queue.Queue[mqtt.MQTTMessage]) -> tuple[bytes, dict[str, Any]]:
    """The offline status the broker published for the agent killed -9."""
    while True:
        msg = statuses.get(timeout=60)
        doc = json.loads(msg.payload)
        if doc.get("state") == "offline":
            return msg.payload, doc


def test_a_status_over_the_brokers_limit_no_longer_keeps_the_agent_off_it(
    agent_factory: Any, pack_v1: Path, tmp_path: Path, topic_prefix: str
) -> None:
    """MQTT 5, nothing known of the limit at the first connect: the bounded will fits a 4 KiB
    broker; killed -9, the broker publishes it, with the groups cut and saying so."""
    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto", max_packet=4096).start()
    try:
        client = Client(broker)
        statuses = client.collect(f"{topic_prefix}/dev-a/status")
        telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
        agent = _start(agent_factory, broker, pack_v1, tmp_path, "--protocol", "5")
        _serving(client, topic_prefix, agent, telemetry)
        agent.kill9()
        payload, will = _will(statuses)
        assert len(payload) <= WILL_BYTES
        assert will["device"] == "dev-a" and will["model"] == {"name": "tiny", "version": 1}
        assert "groups" in will["trimmed"] and will["groups"] == GROUPS[: len(will["groups"])]
        assert will["boot_id"] and will["taken_over"] == 0
        client.close()
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("client_id", "said"),
    [
        ("edge-agent-" + "c" * 300, "the last will is cut to"),
        ("edge-agent-" + "c" * 870, "connecting with no last will"),
    ],
    ids=["cut-to-fit", "no-will"],
)
def test_a_told_limit_cuts_the_will_to_fit_the_connect_or_leaves_it_out(
    agent_factory: Any,
    tight_broker: SmallPacketMosquitto,
    pack_v1: Path,
    tmp_path: Path,
    topic_prefix: str,
    client_id: str,
    said: str,
) -> None:
    """MQTT 3.1.1 with ``max_packet_bytes`` set to the broker's 1 KiB and a long client id: the
    will is cut below its budget so that the CONNECT fits, or, when not even the bare will fits,
    the agent connects without one, and logs which."""
    config = tmp_path / "agent.toml"
    config.write_text("max_packet_bytes = 1024\n")
    client = Client(tight_broker, v5=False)
    statuses = client.collect(f"{topic_prefix}/dev-a/status")
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    agent = _start(
        agent_factory,
        tight_broker,
        pack_v1,
        tmp_path,
        *("--protocol", "3.1.1", "--config", str(config), "--client-id", client_id),
    )
    _serving(client, topic_prefix, agent, telemetry)
    log = agent.output()
    assert said in log, log[-3000:]
    if said.startswith("the last will is cut"):
        agent.kill9()
        payload, will = _will(statuses)
        # Cut below its budget: the client id took the room (the broker took the CONNECT).
        topic = f"{topic_prefix}/dev-a/status"
        assert len(payload) <= 1024 - connect_bytes(client_id, topic, None, None) < WILL_BYTES
        assert will["device"] == "dev-a" and "groups" in will["trimmed"]
    client.close()
