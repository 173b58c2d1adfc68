"""One device's impossible telemetry figures, on a real Mosquitto, must not void the error rate
that decides whether a rollout aborts."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt

from cloud_sync.protocol import Topics
from cloud_sync.watch import FleetWatch
from tests.support.services import Mosquitto


def _batch(device: str, data: dict[str, object], seq: int = 0) -> bytes:
    record = {"device": device, "boot_id": "b", "seq": seq, "ts": 1.0, "kind": "inference"}
    return json.dumps({"records": [{**record, "data": data}]}).encode()


def _status(device: str) -> bytes:
    doc = {"device": device, "state": "online", "model": {"name": "m", "version": 2}}
    return json.dumps(doc).encode()


def test_negative_infinite_and_inconsistent_counts_are_not_counted(
    broker: Mosquitto, topic_prefix: str
) -> None:
    t = Topics(topic_prefix)
    v2 = {"model": {"name": "m", "version": 2}}
    hostile = [
        {**v2, "ok": -1e9},  # once made the fleet's count negative: no error rate at all
        {**v2, "count": 1e400},  # written as Infinity, which is not JSON
        {**v2, "count": 5, "errors": 50},
        {**v2, "count": 10, "p99_ms": -3.0},
    ]
    with FleetWatch(broker.url, t, None).start(settle_s=0) as watch:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for device in ("bad", "good"):  # both run v2, as their statuses say
            client.publish(t.status(device), _status(device), qos=1).wait_for_publish(5)
        for seq, data in enumerate(hostile):
            client.publish(t.telemetry("bad"), _batch("bad", data, seq), qos=1).wait_for_publish(5)
        honest = {**v2, "count": 100, "errors": 10, "p99_ms": 20.0}
        client.publish(t.telemetry("good"), _batch("good", honest), qos=1).wait_for_publish(5)
        # One client's messages reach the watch in the order it published them: once the good
        # batch, published last, is counted, every hostile one before it was handled.
        deadline = time.monotonic() + 30
        while (good := watch.device_stats("good", 2)) is None or good.count < 100:
            assert time.monotonic() < deadline, "the good batch was never counted"
            watch.take_changed()  # so that wait() sleeps, not spins
            watch.wait(0.1)
        client.loop_stop()
        client.disconnect()
        stats = watch.device_stats("good", 2)
        assert stats is not None and (stats.count, stats.errors, stats.p99_ms) == (100, 10, 20.0)
        bad = watch.device_stats("bad", 2)
        assert bad is not None and bad.count == 0
        assert watch.rejected["figures"] >= 3  # the Infinity one may fail to parse instead
