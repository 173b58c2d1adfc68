"""One record with a bad clock must not cost its batch (issue 19, finding 6).

On main a batch of 300 records in which one had ``ts = 0`` (taken before NTP) was acknowledged
as a whole and stored nowhere under ``telemetry/``: the device deleted all 300, and the
``rejected/`` evidence kept only its first 64 KiB. Here, through a real ``edgebento sync``,
Mosquitto and moto's S3: the good records are stored and acknowledged, and each record with an
impossible timestamp, a clock behind or ahead, is kept whole under ``rejected/``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.ingest import TelemetrySync, _Pending
from cloud_sync.store import LocalStore, ObjectStore, open_store
from tests.integration.test_ingest import Device, start_sync, stored, wait_stored
from tests.support.agent import Client, wait_for
from tests.support.services import Mosquitto, MotoS3

pytestmark = pytest.mark.slow


@pytest.fixture
def sync_store(
    broker: Mosquitto, s3_server: MotoS3, s3_bucket: str, topic_prefix: str, tmp_path: Path
) -> Iterator[ObjectStore]:
    url = f"s3://{s3_bucket}/fleet"
    proc = start_sync(
        broker, url, s3_server, topic_prefix, f"clock-{topic_prefix}", tmp_path / "sync.log"
    )
    yield open_store(url, endpoint_url=s3_server.endpoint_url)
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _batch(dev: Device, n: int, bad: dict[int, float]) -> bytes:
    records = []
    for i in range(n):
        ts = bad.get(i, time.time())
        records.append({"device": dev.device, "boot_id": dev.boot_id, "seq": dev.seq, "ts": ts,
                        "kind": "inference", "data": {"count": 1, "pad": "x" * 300}})  # fmt: skip
        dev.seq += 1
    return json.dumps({"schema_version": 1, "records": records}).encode()


def _evidence(store: ObjectStore) -> list[dict[str, Any]]:
    out = []
    for key in store.list("rejected/"):
        doc = json.loads(store.get_bytes(key))
        assert "/reason=timestamp/" in key
        out.extend(json.loads(doc["payload"]))
    return out


@pytest.mark.parametrize(
    "bad_ts", [lambda: 0.0, lambda: time.time() + 3 * 86400], ids=["ts-0", "3-days-ahead"]
)
def test_one_bad_clock_record_in_300_costs_only_itself(
    broker: Mosquitto,
    sync_store: ObjectStore,
    topic_prefix: str,
    client: Client,
    bad_ts: Callable[[], float],
) -> None:
    dev = Device(broker, topic_prefix, "clock-1")
    acks = client.collect(f"{topic_prefix}/clock-1/telemetry/ack")
    payload = _batch(dev, 300, {137: bad_ts()})  # read when it runs, not when it was collected
    assert len(payload) > 64 << 10  # more than the evidence's cut: it must be kept whole
    dev.client.publish(dev.topic, payload, qos=1).wait_for_publish(5)
    got = wait_stored(sync_store, 299)
    seqs = sorted(s for d, b, s in got if d == "clock-1")
    assert seqs == [s for s in range(300) if s != 137]
    ack = wait_for(acks, lambda d: d.get("seq") == 299, timeout=20)
    assert ack["boot_id"] == dev.boot_id
    deadline = time.monotonic() + 10
    while not sync_store.list("rejected/") and time.monotonic() < deadline:
        time.sleep(0.1)
    kept = _evidence(sync_store)
    assert [r["seq"] for r in kept] == [137]
    assert kept[0]["data"]["pad"] == "x" * 300  # the record itself, whole
    dev.close()


def test_devices_whose_clocks_are_off_either_way_within_reason_lose_nothing(
    broker: Mosquitto, sync_store: ObjectStore, topic_prefix: str, client: Client
) -> None:
    """A device 12 h ahead and one 30 days behind (a long offline stretch, a drifting RTC):
    every record of both is stored and acknowledged; nothing is called impossible."""
    acks = client.collect(f"{topic_prefix}/+/telemetry/ack")
    devices = {"ahead-1": 12 * 3600.0, "behind-1": -30 * 86400.0}
    boots = []
    for name, skew in devices.items():
        dev = Device(broker, topic_prefix, name)
        payload = _batch(dev, 100, {i: time.time() + skew for i in range(100)})
        dev.client.publish(dev.topic, payload, qos=1).wait_for_publish(5)
        boots.append(dev.boot_id)
        dev.close()
    got = wait_stored(sync_store, 200)
    for name in devices:
        assert sorted(s for d, _b, s in got if d == name) == list(range(100)), name
    highest: dict[str, int] = {}

    def both_acknowledged(ack: dict[str, Any]) -> bool:
        highest[ack["boot_id"]] = max(highest.get(ack["boot_id"], -1), ack["seq"])
        return all(highest.get(boot) == 99 for boot in boots)

    wait_for(acks, both_acknowledged, timeout=20)
    assert sync_store.list("rejected/") == []


def test_bad_clock_evidence_is_bounded_per_device_and_the_rest_stays_unacknowledged(
    tmp_path: Path,
) -> None:
    """Past a device's evidence budget, its impossible records are not acknowledged: the
    device keeps them (nothing is lost) and the store does not fill with one device's junk."""
    from cloud_sync.ingest import SyncOptions, parse_telemetry
    from cloud_sync.protocol import Topics

    topics = Topics("fleet")
    store = LocalStore(tmp_path)
    sync = TelemetrySync(store, "mqtt://127.0.0.1:1", topics=topics,
                         options=SyncOptions(evidence_bytes_per_device_hour=500))  # fmt: skip

    def message(first: int, bad: set[int]) -> bytes:
        records = [{"device": "d1", "boot_id": "b1", "seq": s, "kind": "inference", "data": {},
                    "ts": 0.0 if s in bad else time.time()} for s in range(first, first + 10)]  # fmt: skip
        return json.dumps({"schema_version": 1, "records": records}).encode()

    for mid, (first, bad) in enumerate([(0, {3}), (10, set(range(10, 20)))]):
        batch = parse_telemetry(topics, "fleet/d1/telemetry", message(first, bad))
        pending = _Pending(mid, 0, 0, batch.records, boots=batch.boots)
        sync._keep_out_of_window("fleet/d1/telemetry", batch.out_of_window, pending)
        sync._buffer.append(pending)
    sync.flush()
    assert stored(store) == [("d1", "b1", s) for s in range(10) if s != 3]
    assert sync.tracker.ack(("d1", "b1")) == 9  # seq 3 kept as evidence; 10..19 over budget
    assert len(store.list("rejected/")) == 1
    assert sync.metrics.rejected.labels("timestamp")._value.get() == 2
