"""Races of the test harness itself, each through the real processes: a port that another process
takes between ``free_port`` and the service's bind."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

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
