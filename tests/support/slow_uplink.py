"""A TCP proxy that delays what a client sends to a server (not what it receives).

On loopback the gap between a broker accepting a client (CONNACK) and confirming its
subscriptions (SUBACK) is microseconds; over a network it is a round trip, which this adds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from tests.support.services import LOOPBACK

DELAY_S = 0.3  # each chunk the client sends reaches the server this much later


@contextlib.contextmanager
def slow_uplink(port: int, delay_s: float = DELAY_S) -> Iterator[int]:
    """A TCP proxy to ``port`` on loopback that delays what the client sends by ``delay_s``;
    the port to connect to instead."""
    server = socket.create_server((LOOPBACK, 0))
    done = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while not done.is_set():
                client, _ = server.accept()
                upstream = socket.create_connection((LOOPBACK, port))
                for args in ((client, upstream, delay_s), (upstream, client, 0.0)):
                    threading.Thread(target=pump, args=args, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        server.close()


@contextlib.contextmanager
def device_client(port: int) -> Iterator[Any]:
    """A plain paho client on loopback ``port``, connected, its loop running: the device."""
    import paho.mqtt.client as mqtt

    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex[:8])
    device.connect(LOOPBACK, port, 30)
    device.loop_start()
    try:
        yield device
    finally:
        device.disconnect()
        device.loop_stop()


def publish_markers_until(
    device: Any,
    topic: Callable[[str], str],
    payload: Callable[[str, int], bytes],
    heard: Callable[[], bool],
    listener: str,
    timeout_s: float = 30.0,
) -> None:
    """Publish markers from ``device`` until ``heard()``. The broker delivers one client's
    messages in order, so once a marker is heard, whatever the device published before it
    either came or was lost for good."""
    deadline, seq = time.monotonic() + timeout_s, 0
    while not heard():
        assert time.monotonic() < deadline, f"{listener} heard nothing"
        device.publish(topic("marker"), payload("marker", seq), qos=1)
        seq += 1
        time.sleep(0.1)
