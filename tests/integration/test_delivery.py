"""End-to-end delivery: real agents, a real sync process and a Mosquitto without persistence,
the broker killed with -9 again and again under telemetry, and the sync process killed too.

On main a record left the outbox on the broker's PUBACK, so each broker kill lost what the broker
had acknowledged but not yet delivered. Now a record leaves only on the ingestion's
``TelemetryAck``; every seq of every boot must be in the store exactly once, or still in the
device's outbox waiting for its acknowledgement.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.store import open_store
from tests.integration.test_ingest import start_sync, stored
from tests.support.agent import AgentProcess
from tests.support.services import MotoS3, VolatileMosquitto

pytestmark = pytest.mark.slow

DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture
def volatile_broker(tmp_path: Path) -> Iterator[VolatileMosquitto]:
    broker = VolatileMosquitto(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


def _outbox(data_dir: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(data_dir / "telemetry.db")
    try:
        return [(b, s) for b, s in db.execute("SELECT boot_id, seq FROM records")]
    finally:
        db.close()


def _counters(data_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(data_dir / "telemetry.db")
    try:
        return dict(db.execute("SELECT name, value FROM counters").fetchall())
    finally:
        db.close()


def test_nothing_is_lost_or_duplicated_across_broker_and_sync_kills(
    volatile_broker: VolatileMosquitto,
    s3_server: MotoS3,
    s3_bucket: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
    pack_v1: Path,
) -> None:
    url = f"s3://{s3_bucket}/fleet"
    store = open_store(url, endpoint_url=s3_server.endpoint_url)
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "sync.log"
    procs.append(start_sync(volatile_broker, url, s3_server, topic_prefix, "sync-d", log))
    env = {"EDGEBENTO_BACKOFF_MAX": "1.0", "EDGEBENTO_BACKOFF_MIN": "0.2"}
    agents = [
        AgentProcess(
            volatile_broker,
            tmp_path / device,
            keys[1],
            topic_prefix,
            device,
            pack_v1,
            ("--telemetry-interval", "0.1", "--ack-timeout", "2"),
            env,
        ).start()
        for device in DEVICES
    ]
    try:
        # The kills come while telemetry flows from every device (on a busy machine the agents
        # may take seconds to start).
        deadline = time.monotonic() + 90
        while {d for d, _, _ in stored(store)} != set(DEVICES):
            assert time.monotonic() < deadline, "telemetry never flowed from every device"
            time.sleep(0.5)
        for kill in range(4):
            volatile_broker.kill()  # persistence off: whatever it held is gone
            time.sleep(0.5)
            volatile_broker.start()
            time.sleep(2.5)
            if kill == 1:
                procs[-1].kill()  # the sync process too, mid-stream
                procs[-1].wait()
                log = tmp_path / "sync-2.log"  # its own: start_sync waits for its first line
                procs.append(
                    start_sync(volatile_broker, url, s3_server, topic_prefix, "sync-d", log)
                )
        # Unacknowledged records time out and are sent again; on a loaded machine that may take
        # a few rounds, so wait for the outboxes to drain (what is left is checked below), and
        # for enough records to have gone through to mean something.
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and (
            any(len(_outbox(a.data_dir)) > 30 for a in agents) or len(stored(store)) <= 300
        ):
            time.sleep(0.5)
        for agent in agents:
            assert agent.stop() == 0  # a clean stop waits for the last acknowledgements
        time.sleep(2)
        _assert_every_seq_once(store, agents, log)
    finally:
        for agent in agents:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.kill()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _assert_every_seq_once(store: Any, agents: list[AgentProcess], sync_log: Path) -> None:
    got = stored(store)
    dupes = [k for k, n in Counter(got).items() if n > 1]
    assert not dupes, f"duplicates in the store: {dupes[:5]}"
    lost: dict[str, int] = {}
    for agent in agents:
        assert _counters(agent.data_dir).get("evicted", 0) == 0
        held = _outbox(agent.data_dir)
        boots = {b for d, b, _ in got if d == agent.device} | {b for b, _ in held}
        assert boots, f"{agent.device} stored nothing"
        for boot in boots:
            in_store = {s for d, b, s in got if d == agent.device and b == boot}
            every = in_store | {s for b, s in held if b == boot}
            missing = set(range(max(every) + 1)) - every
            if missing:
                lost[agent.device] = lost.get(agent.device, 0) + len(missing)
    assert not lost, f"records neither stored nor waiting in the outbox: {lost}"
    assert len(got) > 300
    for agent in agents:
        held = _outbox(agent.data_dir)
        assert len(held) < 50, (
            f"{agent.device} still holds {len(held)} unacknowledged records, from seq "
            f"{min(s for _, s in held)}\nagent:\n{agent.output()[-3000:]}\n"
            f"sync:\n{sync_log.read_text()[-3000:]}"
        )
