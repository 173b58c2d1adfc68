"""Faults injected for real: kill -9 of the broker and of the agent, and a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.support.agent import AgentProcess
from tests.support.services import Mosquitto, free_port


class TelemetrySink:
    """What the cloud does: a persistent QoS 1 subscription that survives broker restarts, and
    a ``TelemetryAck`` of the highest contiguous seq received (from the batch's floor)."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ack_topic = f"{topic}/ack"
        self._seen: dict[str, set[int]] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sink-{uuid.uuid4().hex[:8]}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        # The SUBACK before the agent starts: a batch published earlier reached no subscriber,
        # and the test then depended on the agent's resend coming before its drain timed out.
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", broker.port, 10)
        self.client.loop_start()
        assert subscribed.wait(30), "no SUBACK for the telemetry sink within 30 s"
        self.seen: list[dict[str, Any]] = []

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        batch = json.loads(msg.payload)
        for record in batch["records"]:
            self.records.put(record)
            self._seen.setdefault(record["boot_id"], set()).add(record["seq"])
        boot = batch["records"][0]["boot_id"]
        seen, high = self._seen[boot], batch.get("floor", 0) - 1
        while high + 1 in seen or high + 1 < batch.get("floor", 0):
            high += 1
        ack = {"schema_version": 1, "boot_id": boot, "seq": high}
        client.publish(self.ack_topic, json.dumps(ack), qos=1)

    def drain(self, until: Any, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(self.seen):
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.records.get(timeout=0.1))
        return self.seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def seqs(records: list[dict[str, Any]], boot_id: str) -> set[int]:
    return {r["seq"] for r in records if r["boot_id"] == boot_id}


def outbox_rows(data_dir: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(data_dir / "telemetry.db")) as db:
        try:
            return [(b, s) for b, s in db.execute("SELECT boot_id, seq FROM records ORDER BY id")]
        except sqlite3.OperationalError:
            return []  # the agent is still creating it


def test_kill_9_of_the_broker_during_telemetry_loses_no_seq(
    own_broker: Mosquitto, agent_factory: Any, pack_v1: Path, topic_prefix: str
) -> None:
    sink = TelemetrySink(own_broker, f"{topic_prefix}/dev-a/telemetry")
    try:
        agent: AgentProcess = agent_factory(
            broker=own_broker, pack=pack_v1, args=("--telemetry-interval", "0.05")
        )
        before = len(sink.drain(lambda s: len(s) >= 20, 20))
        boot_id = sink.seen[0]["boot_id"]
        own_broker.kill()
        time.sleep(1.5)  # the agent keeps recording into its outbox meanwhile
        own_broker.start()
        sink.drain(lambda s: len(s) >= before + 80, 30)
        assert agent.stop() == 0  # a clean stop flushes the outbox
        got = seqs(sink.drain(lambda s: False, 2), boot_id)
        assert got == set(range(max(got) + 1)), (
            f"missing seq: {sorted(set(range(max(got) + 1)) - got)[:10]}"
        )
        assert max(got) > 60  # records made while the broker was down are among them
    finally:
        sink.close()


def test_kill_9_of_the_agent_with_a_full_outbox_delivers_everything_after_restart(
    own_broker: Mosquitto, agent_factory: Any, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    own_broker.stop()  # offline: everything stays in the outbox
    agent: AgentProcess = agent_factory(
        broker=own_broker, pack=pack_v1, args=("--telemetry-interval", "0.02")
    )
    data_dir = tmp_path / "agent"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (data_dir / "telemetry.db").exists() and len(outbox_rows(data_dir)) >= 150:
            break
        time.sleep(0.2)
    agent.kill9()
    stored = outbox_rows(data_dir)
    assert len(stored) >= 150
    boot_id = stored[0][0]
    own_broker.start()
    sink = TelemetrySink(own_broker, f"{topic_prefix}/dev-a/telemetry")
    try:
        agent_factory(broker=own_broker, pack=pack_v1)
        got = sink.drain(lambda s: seqs(s, boot_id) >= {s for _, s in stored}, 30)
        delivered = seqs(got, boot_id)
        assert delivered >= {s for _, s in stored}
        assert delivered == set(range(max(delivered) + 1))
    finally:
        sink.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs) that the test can fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 512, 1):  # big writes, then the last few bytes too
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _post(port: int, doc: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read()))


def test_the_outbox_on_a_full_disk_keeps_serving_and_accounts_for_every_seq(
    own_broker: Mosquitto,
    agent_factory: Any,
    pack_v1: Path,
    topic_prefix: str,
    small_disk: Path,
) -> None:
    port = free_port()
    sink = TelemetrySink(own_broker, f"{topic_prefix}/dev-a/telemetry")
    try:
        agent: AgentProcess = agent_factory(
            broker=own_broker,
            pack=pack_v1,
            data_dir=small_disk / "agent",
            args=("--telemetry-interval", "0.02", "--metrics-port", str(port)),
        )
        first = sink.drain(lambda s: len(s) >= 10, 20)
        boot_id = first[0]["boot_id"]
        own_broker.stop()  # records pile up in the outbox, which must grow...
        filler = _fill(small_disk)  # ...on a disk with no space left
        assert os.statvfs(small_disk).f_bavail == 0
        time.sleep(3)
        assert agent.process is not None and agent.process.poll() is None
        answer = _post(port, {"inputs": {"x": [[0.1] * 8]}})
        assert answer["model"] == {"name": "tiny", "version": 1}
        filler.unlink()
        own_broker.start()
        records = sink.drain(
            lambda s: any(
                r["kind"] == "heartbeat"
                and r["data"]["outbox"]["dropped_disk_full"] + r["data"]["outbox"]["evicted"] > 0
                and r["data"]["outbox"]["records"] < 10
                for r in s[-5:]
            ),
            40,
        )
        assert agent.stop() == 0
        records = sink.drain(lambda s: False, 1)
        beats = [r for r in records if r["kind"] == "heartbeat" and r["boot_id"] == boot_id]
        lost = max(b["data"]["outbox"]["evicted"] for b in beats)
        dropped = max(b["data"]["outbox"]["dropped_disk_full"] for b in beats)
        assert lost + dropped > 0, "the disk never filled up"
        got = seqs(records, boot_id)
        # Every seq was delivered or counted as evicted; records that could not be stored at
        # all took no seq, so the numbering has no holes nobody accounts for.
        assert len(got) + lost >= max(got) + 1
        assert "database or disk is full" in agent.output()
    finally:
        sink.close()
