"""A started FleetWatch is subscribed: what a device publishes once ``start`` returned reaches it.

``start`` returned as soon as the broker accepted the connection, and the subscriptions went out
after it: a status or telemetry batch (not retained) published in between never reached the
watch. And ``with FleetWatch(...).start(settle_s=0)``, as the rollout controller opens it,
started it twice: the second connect replaced the first, and its subscriptions again came late.
On loopback the gap is microseconds; over a network it is a round trip, which the proxy here
adds to everything the watch sends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt

from cloud_sync.protocol import Topics
from cloud_sync.watch import FleetWatch
from tests.integration.test_watch_figures import _status
from tests.support.services import LOOPBACK, Mosquitto

DELAY_S = 0.3  # each chunk the watch sends reaches the broker this much later


@contextlib.contextmanager
def slow_uplink(port: int) -> Iterator[int]:
    """A TCP proxy to ``port`` that delays what the client sends (not what it receives); the
    port to connect to instead."""
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
                for args in ((client, upstream, DELAY_S), (upstream, client, 0.0)):
                    threading.Thread(target=pump, args=args, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        server.close()


def test_what_a_device_publishes_once_start_returned_reaches_the_watch(
    broker: Mosquitto, topic_prefix: str
) -> None:
    topics = Topics(topic_prefix)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex[:8])
    device.connect(LOOPBACK, broker.port, 30)
    device.loop_start()
    try:
        with (
            slow_uplink(broker.port) as port,
            FleetWatch(f"mqtt://{LOOPBACK}:{port}", topics, None).start(settle_s=0) as watch,
        ):
            device.publish(topics.status("a"), _status("a"), qos=1).wait_for_publish(10)
            # Then markers from the same client until the watch hears one: the broker delivers
            # one client's messages in order, so by then the first came or was lost for good.
            deadline = time.monotonic() + 30
            while "marker" not in watch.statuses:
                assert time.monotonic() < deadline, "the watch heard nothing"
                device.publish(topics.status("marker"), _status("marker"), qos=1)
                watch.wait(0.1)
            assert "a" in watch.statuses
    finally:
        device.disconnect()
        device.loop_stop()
