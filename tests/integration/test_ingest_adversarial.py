"""Hostile telemetry and status through a real ``edgebento sync`` process and Mosquitto.

On main, one record with ``"ok": -1`` or a 400-digit number raised inside paho's callback and
ended its network thread (the process kept running, storing nothing more); ``ts: 1e13`` killed
the flusher and its buffer; a status naming another device was folded as that device's. Here
each is stored or kept as evidence, acknowledged, counted, and ingestion goes on.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.store import ObjectStore, open_store
from tests.integration.test_ingest import Device, assert_exactly_once, start_sync, wait_stored
from tests.support.agent import Client, wait_for
from tests.support.services import Mosquitto, MotoS3, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def sync_proc(
    broker: Mosquitto, s3_server: MotoS3, s3_bucket: str, topic_prefix: str, tmp_path: Path
) -> Iterator[tuple[ObjectStore, int]]:
    url = f"s3://{s3_bucket}/fleet"
    port = free_port()
    proc = start_sync(
        broker, url, s3_server, topic_prefix, f"adv-{topic_prefix}", tmp_path / "sync.log",
        "--metrics-port", str(port),
    )  # fmt: skip
    yield open_store(url, endpoint_url=s3_server.endpoint_url), port
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()


def _raw(device: Device, records: list[dict]) -> None:
    payload = json.dumps({"schema_version": 1, "records": records}).encode()
    device.client.publish(device.topic, payload, qos=1).wait_for_publish(5)


def _record(dev: Device, **over: object) -> dict:
    record = {"device": dev.device, "boot_id": dev.boot_id, "seq": dev.seq,
              "ts": 1.7e9 + 1e8, "kind": "inference", "data": {}}  # fmt: skip
    record.update(over)
    dev.seq += 1
    return record


def test_no_message_stops_ingestion(
    broker: Mosquitto,
    sync_proc: tuple[ObjectStore, int],
    topic_prefix: str,
    client: Client,
) -> None:
    store, port = sync_proc
    import time

    dev = Device(broker, topic_prefix, "dev-1")
    acks = client.collect(f"{topic_prefix}/dev-1/telemetry/ack")
    now = time.time()
    _raw(dev, [_record(dev, ts=now, data={"ok": -1, "errors": 2})])  # on main: Counter.inc(-1)
    _raw(dev, [_record(dev, ts=now, data={"ok": int("9" * 400)})])  # on main: OverflowError
    _raw(dev, [_record(dev, ts=1e13)])  # on main: the flusher died, its buffer with it
    spoof = {**_record(dev, ts=now), "device": "dev-2", "boot_id": "b-2", "seq": 0}
    dev.seq -= 1
    _raw(dev, [spoof])  # a record naming another device than its topic
    dev.client.publish(dev.topic, b"\xff\xfe not json", qos=1).wait_for_publish(5)
    # A status on dev-1's topic that names dev-2 (a fleet view keyed by payload believed it).
    status = {"schema_version": 1, "device": "dev-2", "state": "offline", "ts": now}
    client.publish(f"{topic_prefix}/dev-1/status", status)
    for _ in range(10):
        dev.send(10)  # good telemetry afterwards: all of it must be stored
    got = wait_stored(store, 102)
    stored_seqs = sorted(s for d, b, s in got if d == "dev-1")
    assert stored_seqs == [0, 1, *range(3, 103)], stored_seqs[:6]
    assert_exactly_once([g for g in got if g[2] >= 3], [])
    deadline = time.monotonic() + 10  # the evidence of the status is written on its own thread
    while len(store.list("rejected/")) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    rejected = store.list("rejected/")
    reasons = sorted(k.split("/reason=")[1].split("/")[0] for k in rejected)
    assert reasons == ["identity", "identity", "schema", "timestamp"], reasons
    evidence = [json.loads(store.get_bytes(k)) for k in rejected]
    assert any("1e+13" in e["error"] or "10000000000000" in e["error"] for e in evidence)
    ack = wait_for(acks, lambda d: d.get("seq") == 102, timeout=20)
    assert ack["boot_id"] == dev.boot_id  # the ts-rejected seq 2 is kept as evidence: acked
    text = _metrics(port)
    assert 'edgebento_sync_rejected_messages_total{reason="identity"} 2.0' in text
    assert 'edgebento_sync_rejected_messages_total{reason="timestamp"} 1.0' in text
    assert 'device="dev-2"' not in text
    assert "edgebento_sync_acks_total" in text
    dev.close()


def test_sync_started_while_the_broker_is_down_waits_for_it(
    own_broker: Mosquitto, s3_server: MotoS3, s3_bucket: str, topic_prefix: str, tmp_path: Path
) -> None:
    """On main ``edgebento sync`` exited when its broker was down at start (a restart during a
    broker outage left the fleet without ingestion, and without acknowledgements)."""
    url = f"s3://{s3_bucket}/fleet"
    own_broker.stop()
    proc = start_sync(own_broker, url, s3_server, topic_prefix, "late", tmp_path / "late.log")
    try:
        time.sleep(2)
        assert proc.poll() is None, (tmp_path / "late.log").read_text()[-2000:]
        own_broker.start()
        dev = Device(own_broker, topic_prefix, "dev-1")
        store = open_store(url, endpoint_url=s3_server.endpoint_url)
        deadline = time.monotonic() + 30
        # This plain publisher does not send again what reached nobody before the sync
        # subscribed (an agent would, on no acknowledgement): publish until it is heard.
        while not store.list("telemetry/") and time.monotonic() < deadline:
            dev.send(1)
            time.sleep(0.5)
        assert store.list("telemetry/"), "the sync never connected once the broker was up"
        assert proc.poll() is None
        dev.close()
    finally:
        proc.kill()
        proc.wait()
