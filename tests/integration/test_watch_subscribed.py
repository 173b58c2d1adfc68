"""A started FleetWatch is subscribed: what a device publishes once ``start`` returned reaches it.

``start`` returned as soon as the broker accepted the connection, and the subscriptions went out
after it: a status or telemetry batch (not retained) published in between never reached the
watch. And ``with FleetWatch(...).start(settle_s=0)``, as the rollout controller opens it,
started it twice: the second connect replaced the first, and its subscriptions again came late.
On loopback the gap is microseconds; over a network it is a round trip, which the proxy here
adds to everything the watch sends.
"""

from __future__ import annotations

import time

from cloud_sync.protocol import Topics
from cloud_sync.watch import FleetWatch
from tests.integration.test_watch_figures import _status
from tests.support.services import LOOPBACK, Mosquitto
from tests.support.slow_uplink import device_client, slow_uplink


def test_what_a_device_publishes_once_start_returned_reaches_the_watch(
    broker: Mosquitto, topic_prefix: str
) -> None:
    topics = Topics(topic_prefix)
    with (
        device_client(broker.port) as device,
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
