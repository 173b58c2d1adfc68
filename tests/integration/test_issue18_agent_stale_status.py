"""The race behind "20 of 20 back" (issue 18, also fix 2), in the real agent: a status the dead
broker never acknowledged is resent by paho on the reconnect, after the on_connect callback.
The agent published its fresh status inside that callback, so the stale one went after it and
was the one the new broker retained, and nothing corrected it. The simulator's fix has its own
test (test_rollout_sim.py); this one is the agent's, through a real agent process, a real
Mosquitto killed with -9, and a proxy that holds what the agent sends for a while, so that the
status it sends at its connect is still on its way when the broker dies."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.protocol import Status, Topics
from tests.support.agent import AgentProcess
from tests.support.services import Mosquitto
from tests.support.slow_uplink import slow_uplink

pytestmark = pytest.mark.integration

HELD_S = 3.0  # what the agent sends reaches the broker this much later


def _retained_status(broker: Mosquitto, topic: str, timeout: float) -> Status | None:
    """The status the broker retains for ``topic`` (None: none within ``timeout``). Only a
    retained delivery counts: one published while the reader is subscribed says nothing of
    what the broker keeps (a stale status may come right after it)."""
    got: list[bytes] = []
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(bytes(msg.payload))

    reader.on_message = on_message
    reader.connect("127.0.0.1", broker.port)
    reader.subscribe(topic, qos=1)
    reader.loop_start()
    try:
        end = time.monotonic() + timeout
        while not got and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        reader.loop_stop()
        reader.disconnect()
    return Status.model_validate_json(got[0]) if got else None


def _connects(agent: AgentProcess) -> int:
    return agent.output().count("connected to ")


def test_a_status_the_dead_broker_never_acknowledged_is_not_what_the_new_one_retains(
    own_broker: Mosquitto, tmp_path: Path, keys: tuple[Path, Path], topic_prefix: str
) -> None:
    topic = Topics(topic_prefix).status("dev-a")
    with slow_uplink(own_broker.port, HELD_S) as port:
        via: Any = SimpleNamespace(url=f"mqtt://127.0.0.1:{port}")
        agent = AgentProcess(via, tmp_path / "agent", keys[1], topic_prefix).start()
        try:
            deadline = time.monotonic() + 60
            while _connects(agent) < 1:  # its CONNACK came back: its status is in the proxy
                assert agent.process is not None and agent.process.poll() is None
                assert time.monotonic() < deadline, agent.output()[-2000:]
                time.sleep(0.02)
            own_broker.kill()  # kill -9, before the status reached it
            killed = time.time()
            own_broker.start()  # same port
            while _connects(agent) < 2:
                assert time.monotonic() < deadline, agent.output()[-2000:]
                time.sleep(0.05)
            # The status the new broker keeps is one sent after the kill, whatever paho resent.
            while True:
                status = _retained_status(own_broker, topic, 1.0)
                if status is not None and status.ts > killed:
                    break
                assert time.monotonic() < deadline, ("stale", None if status is None else status)
            assert status.state == "online"
        finally:
            # kill -9: a clean stop here waited for telemetry acknowledgements no ingestion
            # sends, and for its offline status through the slow uplink (4 s, checking nothing).
            agent.kill9()
