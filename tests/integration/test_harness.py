"""The harness itself: a real Mosquitto (plain, and with passwords and an ACL) and moto's S3."""

from __future__ import annotations

import queue
import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.support.services import LOOPBACK, Mosquitto, MotoS3


def _client(broker: Mosquitto, user: str | None = None, password: str | None = None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
    if user:
        client.username_pw_set(user, password)
    return client


def _connect(client: mqtt.Client, broker: Mosquitto) -> int:
    """Connect and return the broker's reason code (0 when accepted)."""
    result: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: result.put(rc.value)
    client.connect(LOOPBACK, broker.port)
    client.loop_start()
    return result.get(timeout=10)


def _roundtrip(client: mqtt.Client, topic: str) -> bytes | None:
    got: queue.Queue[bytes] = queue.Queue()
    client.on_message = lambda c, u, msg: got.put(msg.payload)
    client.subscribe(topic, qos=1)
    client.publish(topic, b"hello", qos=1).wait_for_publish(5)
    try:
        return got.get(timeout=2)
    except queue.Empty:
        return None


def test_plain_broker_round_trip(broker: Mosquitto, topic_prefix: str) -> None:
    client = _client(broker)
    assert _connect(client, broker) == 0
    assert _roundtrip(client, f"{topic_prefix}/x") == b"hello"
    client.loop_stop()
    client.disconnect()


def test_auth_broker_refuses_a_wrong_password(auth_broker: Mosquitto) -> None:
    client = _client(auth_broker, "dev-a", "wrong")
    assert _connect(client, auth_broker) != 0
    client.loop_stop()


def test_acl_confines_a_device_to_its_own_topics(auth_broker: Mosquitto) -> None:
    """The ACL of deploy/mosquitto/ (tests/integration/test_broker_acl.py has the rest): what a
    device publishes on its own telemetry reaches the operator; on another's, nobody."""
    device = _client(auth_broker, "dev-a", "pw-a")
    operator = _client(auth_broker, "operator", "operator-secret")
    assert _connect(device, auth_broker) == 0 and _connect(operator, auth_broker) == 0
    got: queue.Queue[str] = queue.Queue()
    operator.on_message = lambda c, u, msg: got.put(msg.topic) if not msg.retain else None
    subscribed: queue.Queue[int] = queue.Queue()
    operator.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(mid)
    _, mid = operator.subscribe("edgebento/+/telemetry", qos=1)
    assert subscribed.get(timeout=30) == mid  # the SUBACK before anything is published
    device.publish("edgebento/dev-b/telemetry", b"forged", qos=1).wait_for_publish(5)
    device.publish("edgebento/dev-a/telemetry", b"own", qos=1).wait_for_publish(5)
    assert got.get(timeout=5) == "edgebento/dev-a/telemetry"  # the forged one never came first
    assert got.empty()
    for client in (device, operator):
        client.loop_stop()
        client.disconnect()


def test_broker_can_be_killed_and_restarted(own_broker: Mosquitto, topic_prefix: str) -> None:
    own_broker.kill()
    own_broker.start()
    client = _client(own_broker)
    assert _connect(client, own_broker) == 0
    assert _roundtrip(client, f"{topic_prefix}/after-restart") == b"hello"
    client.loop_stop()
    client.disconnect()


def test_moto_s3_through_real_boto3(s3_server: MotoS3, s3_bucket: str) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"data")  # type: ignore[attr-defined]
    body = s3.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read()  # type: ignore[attr-defined]
    assert body == b"data"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("n", [2])
def test_each_broker_fixture_gets_its_own_port(
    broker: Mosquitto, auth_broker: Mosquitto, n: int
) -> None:
    assert len({broker.port, auth_broker.port}) == n
