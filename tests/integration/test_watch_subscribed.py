"""A started FleetWatch is subscribed: what a device publishes once ``start`` returned reaches it.

``start`` returned as soon as the broker accepted the connection, and the subscriptions went out
after it: a status or telemetry batch (not retained) published in between never reached the
watch. And ``with FleetWatch(...).start(settle_s=0)``, as the rollout controller opens it,
started it twice: the second connect replaced the first, and its subscriptions again came late.
On loopback the gap is microseconds; over a network it is a round trip, which the proxy here
adds to everything the watch sends.
"""

from __future__ import annotations

from cloud_sync.protocol import Topics
from cloud_sync.watch import FleetWatch
from tests.integration.test_watch_figures import _status
from tests.support.services import LOOPBACK, Mosquitto
from tests.support.slow_uplink import device_client, publish_markers_until, slow_uplink


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
        publish_markers_until(
            device,
            topics.status,
            lambda d, _: _status(d),
            lambda: "marker" in watch.statuses,
            "the watch",
        )
        assert "a" in watch.statuses
