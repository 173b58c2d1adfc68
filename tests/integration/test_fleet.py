"""``edgebento fleet status`` against real agents: retained status, telemetry, pending updates."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.protocol import Desired, ModelRef, Topics
from cloud_sync.watch import FleetWatch
from edgebento.cli import main
from tests.support.agent import AgentProcess
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow


def test_fleet_status_shows_each_device(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    agents = fleet(["a", "b"])
    agents[1].stop()
    topics = Topics(topic_prefix)
    stop = threading.Event()

    def traffic(watch: FleetWatch) -> None:  # inference requests while fleet status listens
        i = 0
        while not stop.is_set():
            body = {"id": f"r{i}", "inputs": {"x": [[0.1] * 8]}}
            watch.client.publish(topics.infer("a"), json.dumps(body).encode())
            i += 1
            time.sleep(0.02)

    watch = FleetWatch(broker.url, topics).start()
    watch.set_desired("b", Desired(model=ModelRef(name="tiny", version=2)))
    sender = threading.Thread(target=traffic, args=(watch,))
    sender.start()
    args = ["fleet", "status", "--broker", broker.url, "--prefix", topic_prefix]
    try:
        assert main([*args, "--json", "--listen", "2"]) == 0
    finally:
        stop.set()
        sender.join()
        watch.stop()
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert devices["a"]["state"] == "online" and devices["a"]["version"] == 1
    assert devices["a"]["inferences"] >= 1 and devices["a"]["last_seen"] > time.time() - 30
    assert devices["b"]["state"] == "offline"
    assert devices["b"]["pending_update"] is True and devices["b"]["desired_version"] == 2
    assert main([*args, "--listen", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "online" in table and "offline" in table and "-> v2" in table


def test_agent_telemetry_lands_in_the_store_and_feeds_fleet_status(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real agent -> Mosquitto -> TelemetrySync -> the store -> ``fleet status --store``."""
    from cloud_sync.ingest import SyncOptions, TelemetrySync
    from cloud_sync.parts import decode_jsonl_gz
    from cloud_sync.store import open_store

    store = open_store(tmp_path / "telemetry")
    topics = Topics(topic_prefix)
    options = SyncOptions(client_id=f"{topic_prefix}-sync", flush_interval_s=0.3)

    def stored() -> list[dict[str, Any]]:
        return [r for k in store.list("telemetry/") for r in decode_jsonl_gz(store.get_bytes(k))]

    def answered(records: list[dict[str, Any]]) -> int:
        return sum(r["data"].get("ok", 0) for r in records if r["kind"] == "inference")

    with TelemetrySync(store, broker.url, topics=topics, options=options):
        fleet(["a"])
        with FleetWatch(broker.url, topics) as watch:
            for i in range(30):
                body = {"id": f"r{i}", "inputs": {"x": [[0.2] * 8]}}
                watch.client.publish(topics.infer("a"), json.dumps(body).encode())
        # Until the agent's telemetry of the 30 came through the sync into the store.
        deadline = time.monotonic() + 60
        while answered(stored()) < 30 and time.monotonic() < deadline:
            time.sleep(0.3)
    records = stored()
    assert {r["device"] for r in records} == {"a"}
    seqs = sorted(r["seq"] for r in records)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a duplicate"
    assert answered(records) == 30

    args = ["fleet", "status", "--broker", broker.url, "--prefix", topic_prefix]
    assert main([*args, "--store", str(tmp_path / "telemetry"), "--listen", "0", "--json"]) == 0
    device = json.loads(capsys.readouterr().out)["devices"]["a"]
    assert device["version"] == 1 and device["last_seen"] > time.time() - 30
    assert device["inferences"] >= 1 and device["inference_rate"] is not None
