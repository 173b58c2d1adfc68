"""The ACL of deploy/mosquitto/, enforced by a real Mosquitto (issue 19, finding 9).

docs/security.md pointed at `deploy/` for an ACL that was not there, and the one the tests used
(`{prefix}/{device}/#`) let a device publish a retained desired state on its own topic with
`generation: 10**6`, after which `rollout resume` refused to finish an abort. Under the shipped
ACL a device publishes only its own status, telemetry and replies, reads only its own requests,
and only the cloud's identities write desired states and commands.
"""

from __future__ import annotations

import contextlib
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEVICE_PASSWORDS
from tests.support.agent import Client, wait_online
from tests.support.services import Mosquitto

PREFIX = "edgebento"


def _as(broker: Mosquitto, user: str) -> Client:
    return Client(broker, username=user, password=DEVICE_PASSWORDS[user])


@pytest.fixture
def watcher(auth_broker: Mosquitto) -> Iterator[Client]:
    """The operator sees every topic under the prefix: what it does not see, nobody does."""
    client = _as(auth_broker, "operator")
    yield client
    client.close()


def _seen(q: Any, expect: int = 0, retained: bool = False) -> list[tuple[str, bytes]]:
    """What reached the subscriber; retained messages (left by earlier tests on this shared
    broker) only when asked for. The ``expect`` messages a test knows must come are waited for
    (a busy machine may take longer than the second below to deliver them); then a second
    more, for anything else the broker accepted to show up too."""
    out: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + 30
    while len(out) < expect and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            msg = q.get(timeout=0.1)
            if retained or not msg.retain:
                out.append((msg.topic, bytes(msg.payload)))
    time.sleep(1.0)  # the broker had time to deliver anything else it accepted
    while not q.empty():
        msg = q.get()
        if retained or not msg.retain:
            out.append((msg.topic, bytes(msg.payload)))
    return out


def test_a_device_cannot_speak_for_another_nor_write_desired_states_or_commands(
    auth_broker: Mosquitto, watcher: Client
) -> None:
    everything = watcher.collect(f"{PREFIX}/#")
    device = _as(auth_broker, "dev-a")
    forged = {"schema_version": 1, "name": "digits", "version": 1, "generation": 10**6}
    for topic in (
        f"{PREFIX}/dev-b/status",
        f"{PREFIX}/dev-b/telemetry",
        f"{PREFIX}/dev-b/replies/x",
        f"{PREFIX}/dev-a/desired",
        f"{PREFIX}/dev-b/desired",
        f"{PREFIX}/dev-b/cmd/deploy",
        f"{PREFIX}/group/lobby/cmd/deploy",
        f"{PREFIX}/dev-b/telemetry/ack",
        f"{PREFIX}/dev-a/telemetry/ack",
    ):
        device.publish(topic, forged, retain=topic.endswith("desired"))
    device.publish(f"{PREFIX}/dev-a/telemetry", {"own": True})
    seen = _seen(everything, expect=1)
    assert [t for t, _ in seen] == [f"{PREFIX}/dev-a/telemetry"], seen
    # Nothing retained either: a later subscriber to the desired states finds none.
    late = _as(auth_broker, "controller")
    kept = _seen(late.collect(f"{PREFIX}/+/desired"), retained=True)
    assert not [t for t, p in kept if json.loads(p).get("generation") == 10**6], kept
    device.close()
    late.close()


def test_a_device_reads_only_its_own_requests(auth_broker: Mosquitto) -> None:
    a, operator = _as(auth_broker, "dev-a"), _as(auth_broker, "operator")
    wide = _as(auth_broker, "dev-a")  # its own connection: overlapping filters deliver twice
    mine = a.collect(f"{PREFIX}/dev-a/cmd/#")
    theirs = a.collect(f"{PREFIX}/dev-b/#")
    anything = wide.collect("#")
    operator.publish(f"{PREFIX}/dev-b/cmd/ping", {"id": "p1"})
    operator.publish(f"{PREFIX}/dev-b/infer", {"id": "i1"})
    operator.publish(f"{PREFIX}/dev-a/cmd/ping", {"id": "p2"})
    assert [t for t, _ in _seen(mine, expect=1)] == [f"{PREFIX}/dev-a/cmd/ping"]
    assert _seen(theirs) == []
    assert [t for t, _ in _seen(anything)] in ([], [f"{PREFIX}/dev-a/cmd/ping"])
    wide.close()
    a.close()
    operator.close()


def test_the_cloud_identities_have_their_rights_and_no_more(auth_broker: Mosquitto) -> None:
    sync, controller, operator = (_as(auth_broker, u) for u in ("sync", "controller", "operator"))
    shared = sync.collect(f"$share/edgebento-sync/{PREFIX}/+/telemetry")
    sync.queues[f"{PREFIX}/+/telemetry"] = shared  # messages carry the topic without $share/
    acks = operator.collect(f"{PREFIX}/+/telemetry/ack")
    desired = operator.collect(f"{PREFIX}/+/desired")
    device = _as(auth_broker, "dev-a")
    device.publish(f"{PREFIX}/dev-a/telemetry", {"n": 1})
    assert [t for t, _ in _seen(shared, expect=1)] == [f"{PREFIX}/dev-a/telemetry"]
    sync.publish(f"{PREFIX}/dev-a/telemetry/ack", {"seq": 1})
    sync.publish(f"{PREFIX}/dev-a/desired", {"generation": 5})  # not the ingestion's to write
    assert [t for t, _ in _seen(acks, expect=1)] == [f"{PREFIX}/dev-a/telemetry/ack"]
    assert _seen(desired) == []
    controller.publish(f"{PREFIX}/dev-a/desired", {"generation": 5})
    controller.publish(f"{PREFIX}/dev-a/telemetry/ack", {"seq": 99})  # only sync acknowledges
    assert [json.loads(p) for _, p in _seen(desired, expect=1)] == [{"generation": 5}]
    assert _seen(acks) == []
    for c in (sync, controller, operator, device):
        c.close()


def test_a_real_agent_works_under_the_acl_and_answers_into_its_replies_tree(
    auth_broker: Mosquitto, agent_factory: Any, pack_v1: Path
) -> None:
    agent_factory(
        broker=auth_broker,
        pack=pack_v1,
        prefix=PREFIX,
        env={"EDGEBENTO_USERNAME": "dev-a", "EDGEBENTO_PASSWORD": DEVICE_PASSWORDS["dev-a"]},
    )
    controller = _as(auth_broker, "controller")
    wait_online(controller, PREFIX, "dev-a")
    controller.reply_topic = f"{PREFIX}/dev-a/replies/controller"
    controller.collect(controller.reply_topic)
    assert controller.request(f"{PREFIX}/dev-a/cmd/ping", {})["ok"] is True
    controller.close()
