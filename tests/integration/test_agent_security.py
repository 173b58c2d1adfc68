"""Broker credentials and ACLs: a wrong password stops the agent with a clear error, and a device
with its own credentials works inside its own topics and nowhere else."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEVICE_PASSWORDS
from tests.support.agent import AgentProcess, Client, wait_online
from tests.support.services import Mosquitto


def test_bad_credentials_stop_the_agent_with_a_clear_error(
    auth_broker: Mosquitto, agent_factory: Any, pack_v1: Path
) -> None:
    agent: AgentProcess = agent_factory(
        broker=auth_broker,
        pack=pack_v1,
        prefix="edgebento",
        env={"EDGEBENTO_USERNAME": "dev-a", "EDGEBENTO_PASSWORD": "wrong"},
    )
    assert agent.process is not None
    code = agent.process.wait(30)  # it gives up instead of retrying for ever
    assert code == 3
    assert "rejected the credentials of dev-a" in agent.output()
    assert "not retrying" in agent.output()


@pytest.fixture
def admin(auth_broker: Mosquitto) -> Any:
    c = Client(auth_broker, username="operator", password=DEVICE_PASSWORDS["operator"])
    c.reply_topic = "edgebento/dev-a/replies/admin"  # where dev-a may write
    c.collect(c.reply_topic)
    yield c
    c.close()


def test_a_device_with_its_own_credentials_is_confined_to_its_topics(
    auth_broker: Mosquitto, agent_factory: Any, pack_v1: Path, admin: Client
) -> None:
    agent_factory(
        broker=auth_broker,
        pack=pack_v1,
        prefix="edgebento",
        env={"EDGEBENTO_USERNAME": "dev-a", "EDGEBENTO_PASSWORD": DEVICE_PASSWORDS["dev-a"]},
    )
    wait_online(admin, "edgebento", "dev-a")
    assert admin.request("edgebento/dev-a/cmd/ping", {})["ok"] is True
    # A reply it is asked to send into another device's topics is dropped by the broker.
    elsewhere = admin.collect("edgebento/dev-b/replies/#")
    admin.reply_topic = "edgebento/dev-b/replies/admin"
    admin.publish("edgebento/dev-a/cmd/ping", {"id": "sneaky", "reply_to": admin.reply_topic})
    # The agent answers pings in the order they come, and the broker passes its publishes to
    # admin in that order: once the answer to a second ping, into dev-a's own replies, is here,
    # an answer that got through to dev-b's topics would have been here before it.
    admin.reply_topic = "edgebento/dev-a/replies/admin"
    assert admin.request("edgebento/dev-a/cmd/ping", {}, via="reply_to")["ok"] is True
    assert elsewhere.empty()


def test_a_devices_credentials_cannot_act_as_another_device(
    auth_broker: Mosquitto, agent_factory: Any, pack_v1: Path, admin: Client, tmp_path: Path
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    impostor: AgentProcess = agent_factory(
        broker=auth_broker,
        pack=pack_v1,
        prefix="edgebento",
        device="dev-b",
        data_dir=tmp_path / "impostor",
        args=("--group", group),
        env={"EDGEBENTO_USERNAME": "dev-a", "EDGEBENTO_PASSWORD": DEVICE_PASSWORDS["dev-a"]},
    )
    status = admin.collect("edgebento/dev-b/status")
    # Answers go where dev-a's credentials may write (dev-a's replies), so that an answer the
    # impostor gives is heard, not dropped by the broker.
    replies = admin.queues[admin.reply_topic]
    group_ping = f"edgebento/group/{group}/cmd/ping"
    # A ping to its group (which any device may read) answered: the broker has taken its
    # subscriptions, dev-b's included, sent before on the same connection. Until then a ping is
    # lost, and asked again (on a busy machine the agent may take seconds to start).
    deadline = time.monotonic() + 60
    while True:
        assert impostor.process is not None and impostor.process.poll() is None, impostor.output()
        try:
            admin.request(group_ping, {}, timeout=2.0, via="reply_to")
            break
        except AssertionError:
            assert time.monotonic() < deadline, impostor.output()[-2000:]
    # Its subscriptions to dev-b's commands were refused, so nobody answers there: a ping to
    # dev-b, then one to the group; the agent answers in order, so an answer to the first would
    # be here before the second's.
    admin.publish("edgebento/dev-b/cmd/ping", {"id": "as-dev-b", "reply_to": admin.reply_topic})
    marker = uuid.uuid4().hex
    admin.publish(group_ping, {"id": marker, "reply_to": admin.reply_topic})
    answered: list[str] = []
    while marker not in answered:
        answered.append(json.loads(replies.get(timeout=20).payload).get("id"))
    assert "as-dev-b" not in answered
    # ...and it cannot claim dev-b's status, though it runs.
    assert impostor.process is not None and impostor.process.poll() is None
    assert all(not m.payload or b'"online"' not in m.payload for m in list(status.queue))
