"""Races of the test harness itself, each through the real processes: a port that another process
takes between ``free_port`` and the service's bind (Mosquitto, Prometheus), a message the
cloud-side test watch cannot read, which must not end paho's network loop, and two tests' agents
of the same device name on the session's broker."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgebento.localservices import Prometheus
from tests.support.agent import Client, ModuleAgent, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import LOOPBACK, Mosquitto


@contextlib.contextmanager
def squatter(port: int) -> Iterator[socket.socket]:
    """Another process's listener on ``port``: it accepts connections and says nothing."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the killed one's TIME_WAIT
        s.bind((LOOPBACK, port))
        s.listen(8)
        yield s


def _connack(port: int) -> int:
    """The reason code of the CONNACK a broker on ``port`` sends (0: accepted)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex[:8])
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    client.connect(LOOPBACK, port, 30)
    try:
        while not codes:
            assert client.loop(1.0) == mqtt.MQTT_ERR_SUCCESS, "the connection ended: no broker"
        return codes[0]
    finally:
        client.disconnect()


def test_a_broker_whose_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    """Before, the start waited for a connect, which the port's new owner answered: the broker
    had exited on EADDRINUSE and every client of the test talked to the other process."""
    broker = Mosquitto(workdir=tmp_path / "mosquitto")
    picked = broker.port
    with squatter(picked):
        broker.start()
        try:
            assert broker.port != picked
            assert broker.process is not None and broker.process.poll() is None
            assert _connack(broker.port) == 0
        finally:
            broker.stop()


def test_a_restarted_broker_keeps_its_port_or_says_it_was_taken(tmp_path: Path) -> None:
    """A restart after a kill -9 comes back on the port its clients know; if another process
    holds it by then, the start says so instead of passing the other process off as the
    broker."""
    broker = Mosquitto(workdir=tmp_path / "mosquitto").start()
    port = broker.port
    try:
        broker.kill()
        broker.start()
        assert broker.port == port and _connack(port) == 0
        broker.kill()
        with squatter(port), pytest.raises(RuntimeError, match="did not start"):
            broker.start()
    finally:
        broker.stop()


def test_a_prometheus_whose_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    """As the broker: the port's new owner answered the connect the start waited for."""
    prometheus = Prometheus(workdir=tmp_path / "prometheus", targets={})
    picked = prometheus.port
    with squatter(picked):
        prometheus.start()
        try:
            assert prometheus.port != picked
            assert prometheus.api("status/buildinfo")["version"]
        finally:
            prometheus.stop()


def test_a_message_the_watch_cannot_read_does_not_end_its_network_loop(
    broker: Mosquitto, topic_prefix: str
) -> None:
    """paho re-raises what a callback raises, which ended DeviceWatch's network thread: every
    later record was lost, and the test waiting for one timed out far from the cause."""
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex[:8])
    sender.connect(LOOPBACK, broker.port, 30)
    sender.loop_start()
    try:
        record = {"boot_id": "b", "seq": 0, "ts": 1.0, "kind": "event", "data": {"event": "x"}}
        for payload in (b"\xff not json", b'{"records": []}', b"[1]"):
            sender.publish(watch.telemetry, payload, qos=1).wait_for_publish(10)
        batch = json.dumps({"schema_version": 1, "records": [record]})
        sender.publish(watch.telemetry, batch, qos=1).wait_for_publish(10)
        assert watch.wait(lambda records: records) == [record]
        assert watch.client.is_connected()
        assert len(watch.unreadable) == 3
    finally:
        sender.disconnect()
        sender.loop_stop()
        watch.close()


def test_two_tests_agents_of_one_device_name_never_take_each_others_session(
    module_agent: ModuleAgent, agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    """Every test's agent is ``dev-a``. With the agent's default client id (``edge-agent-DEVICE``)
    a module's agent and a test's own on the shared broker took the session from each other
    (Mosquitto drops the older connection), and a burst sent to one was delivered to the other
    and ignored there: CI lost test_agent_serving's whole burst so."""
    wait_online(client, module_agent.prefix, "dev-a")
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    time.sleep(1.5)  # past either agent's reconnect back-off (0.3-0.5 s at first)
    for log in (agent.output(), module_agent.agent.output()):
        assert "disconnected from" not in log, log[-2000:]
