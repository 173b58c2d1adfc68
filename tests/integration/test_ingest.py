"""Telemetry ingestion against a real Mosquitto and moto's S3 server, sync in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.store import ObjectStore, open_store
from tests.support.promtool import assert_promtool_passes
from tests.support.services import Mosquitto, MotoS3, free_port

pytestmark = pytest.mark.slow


class Device:
    """Publishes TelemetryBatch messages the way an agent's outbox does: QoS 1, in seq order."""

    def __init__(self, broker: Mosquitto, prefix: str, device: str) -> None:
        import paho.mqtt.client as mqtt

        self.topic = f"{prefix}/{device}/telemetry"
        self.device, self.boot_id, self.seq = device, uuid.uuid4().hex[:12], 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{device}-{uuid.uuid4().hex[:6]}"
        )
        self.client.reconnect_delay_set(1, 4)  # like the agent's backoff: not before 1 s
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()

    def send(self, n: int, kind: str = "inference") -> None:
        records = []
        for _ in range(n):
            records.append(
                {
                    "device": self.device,
                    "boot_id": self.boot_id,
                    "seq": self.seq,
                    "ts": time.time(),
                    "kind": kind,
                    "data": {"count": 10, "errors": 1, "p50_ms": 1.0, "p99_ms": 3.0, "window_s": 1},
                }
            )
            self.seq += 1
        payload = json.dumps({"schema_version": 1, "records": records}).encode()
        # Like the agent's outbox: send again until the broker acknowledges (at least once).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.client.is_connected():
                time.sleep(0.05)
                continue
            info = self.client.publish(self.topic, payload, qos=1)
            try:
                info.wait_for_publish(timeout=5)
                if info.is_published():
                    return
            except RuntimeError:
                continue
        raise TimeoutError("the broker never acknowledged a telemetry batch")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_sync(
    broker: Mosquitto,
    store_url: str,
    s3: MotoS3,
    prefix: str,
    client_id: str,
    log: Path,
    *extra: str,
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from edgebento.cli import main; sys.exit(main())",
            "-v",
            "sync",
            "--broker",
            broker.url,
            "--store",
            store_url,
            "--prefix",
            prefix,
            "--client-id",
            client_id,
            "--flush-interval",
            "0.3",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    deadline = time.monotonic() + 30
    while "syncing telemetry" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "sync did not start"
        time.sleep(0.05)
    return proc


def stored(store: ObjectStore) -> list[tuple[str, str, int]]:
    out = []
    for key in store.list("telemetry/"):
        for r in decode_jsonl_gz(store.get_bytes(key)):
            out.append((r["device"], r["boot_id"], r["seq"]))
    return out


def wait_stored(
    store: ObjectStore, expected: int, timeout: float = 60
) -> list[tuple[str, str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        got = stored(store)
        if len(set(got)) >= expected or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def assert_exactly_once(got: list[tuple[str, str, int]], devices: list[Device]) -> None:
    dupes = [k for k, n in Counter(got).items() if n > 1]
    assert not dupes, f"duplicates in the store: {dupes[:5]}"
    for dev in devices:
        seqs = sorted(s for d, b, s in got if d == dev.device and b == dev.boot_id)
        assert seqs == list(range(dev.seq)), (
            f"{dev.device}: missing {set(range(dev.seq)) - set(seqs)}"
        )


@pytest.fixture
def bucket_url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/fleet"


@pytest.fixture
def s3_store(bucket_url: str, s3_server: MotoS3) -> ObjectStore:
    return open_store(bucket_url, endpoint_url=s3_server.endpoint_url)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sync_kill_9_loses_and_duplicates_nothing(
    own_broker: Mosquitto,
    s3_server: MotoS3,
    bucket_url: str,
    s3_store: ObjectStore,
    topic_prefix: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    log = tmp_path / "sync.log"
    procs.append(start_sync(own_broker, bucket_url, s3_server, topic_prefix, "sync-a", log))
    dev = Device(own_broker, topic_prefix, "dev-1")
    for _ in range(30):
        dev.send(10)
    procs[0].send_signal(signal.SIGKILL)  # mid-stream: some batches buffered, not yet acked
    procs[0].wait()
    for _ in range(30):
        dev.send(10)  # queued by the broker for sync-a's session
    procs.append(start_sync(own_broker, bucket_url, s3_server, topic_prefix, "sync-a", log))
    for _ in range(20):
        dev.send(10)
    got = wait_stored(s3_store, 800)
    dev.close()
    assert_exactly_once(got, [dev])
    keys = s3_store.list("telemetry/")
    assert all(k.endswith(".jsonl.gz") and "/device=dev-1/part-" in k for k in keys)


def test_broker_kill_9_during_telemetry_loses_nothing(
    own_broker: Mosquitto,
    s3_server: MotoS3,
    bucket_url: str,
    s3_store: ObjectStore,
    topic_prefix: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    procs.append(
        start_sync(own_broker, bucket_url, s3_server, topic_prefix, "sync-b", tmp_path / "s.log")
    )
    # Until Mosquitto saved the sync's session with its subscription (it saves every second or
    # two, by the clock): a kill -9 before that would forget it, whatever the sync does.
    saved = own_broker.workdir / "mosquitto.db"
    deadline = time.monotonic() + 30
    while not (saved.exists() and topic_prefix.encode() in saved.read_bytes()):
        assert time.monotonic() < deadline, "Mosquitto never saved the sync's subscription"
        time.sleep(0.1)
    dev = Device(own_broker, topic_prefix, "dev-2")
    for _ in range(20):
        dev.send(10)
        time.sleep(0.01)
    own_broker.kill()
    own_broker.start()
    for _ in range(20):
        dev.send(10)
    got = wait_stored(s3_store, 400)
    dev.close()
    assert_exactly_once(got, [dev])


def test_two_sync_processes_share_one_subscription(
    broker: Mosquitto,
    s3_server: MotoS3,
    bucket_url: str,
    s3_store: ObjectStore,
    topic_prefix: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    share = f"s{uuid.uuid4().hex[:6]}"
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    metrics_port = free_port()
    procs.append(
        start_sync(
            broker,
            bucket_url,
            s3_server,
            topic_prefix,
            f"{share}-1",
            logs[0],
            "--share",
            share,
            "--metrics-port",
            str(metrics_port),
        )
    )
    procs.append(
        start_sync(
            broker, bucket_url, s3_server, topic_prefix, f"{share}-2", logs[1], "--share", share
        )
    )
    devices = [Device(broker, topic_prefix, f"dev-{i}") for i in range(3)]
    devices[0].client.publish(f"{topic_prefix}/dev-0/telemetry", b"{not json", qos=1)
    for _ in range(20):
        for dev in devices:
            dev.send(5)
    got = wait_stored(s3_store, 300)
    assert_exactly_once(got, devices)
    (rejected,) = s3_store.list("rejected/")
    evidence = json.loads(s3_store.get_bytes(rejected))
    assert evidence["payload"] == "{not json" and "dev-0/telemetry" in evidence["topic"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert "edgebento_fleet_inferences_total" in metrics
    assert_promtool_passes(metrics)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    shares = [int(log.read_text().split("stopped: ")[1].split(" records")[0]) for log in logs]
    assert sum(shares) == 300 and all(s > 0 for s in shares), shares
    for dev in devices:
        dev.close()
