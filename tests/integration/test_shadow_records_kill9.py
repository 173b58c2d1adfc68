"""Shadow figures are telemetry like any other: a real agent shadowing v2 on live inputs, a
real Mosquitto without persistence killed -9 and restarted meanwhile, ``edgebento sync`` storing
what arrives. Every record of the agent's boot is stored once (nothing lost, nothing doubled),
and the last stored shadow record holds the figures the agent reports when the shadow stops."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from tests.integration.test_drift_e2e import start_sync
from tests.support.agent import AgentProcess, Client, make_pack, wait_online
from tests.support.services import Mosquitto, VolatileMosquitto

pytestmark = pytest.mark.slow


@pytest.fixture
def volatile_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = VolatileMosquitto(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


def stored(store: Path) -> list[dict]:
    s = open_store(str(store))
    return [
        r
        for key in s.list("")
        if key.endswith(".jsonl.gz")
        for r in decode_jsonl_gz(s.get_bytes(key))
        if r.get("device") == "dev-s"
    ]


def test_shadow_records_survive_a_broker_kill_9(
    volatile_broker: Mosquitto,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
) -> None:
    registry_dir = tmp_path / "registry"
    registry = Registry(open_store(str(registry_dir)))
    v1 = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
    registry.publish(v1, key=keys[0])
    registry.publish(make_pack(tmp_path / "v2", mlp_model, keys[0], 2), key=keys[0])
    store = tmp_path / "telemetry-store"
    agent = AgentProcess(
        volatile_broker,
        tmp_path / "agent",
        keys[1],
        topic_prefix,
        device="dev-s",
        pack=v1,
        args=("--store", str(registry_dir), "--ack-timeout", "1", "--telemetry-interval", "0.3"),
    ).start()
    client = Client(volatile_broker)
    sync = start_sync(volatile_broker, store, topic_prefix, tmp_path / "sync.log")
    rng = np.random.default_rng(0)

    def traffic(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            x = rng.standard_normal((1, 8)).tolist()
            reply = client.request(f"{topic_prefix}/dev-s/infer", {"inputs": {"x": x}})
            assert "outputs" in reply, reply

    try:
        wait_online(client, topic_prefix, "dev-s", 1)
        started = client.request(
            f"{topic_prefix}/dev-s/cmd/shadow",
            {"action": "start", "name": "tiny", "version": 2, "rate": 50},
            timeout=60,
        )
        assert started["ok"], started
        traffic(1.5)
        volatile_broker.kill()  # records in flight and in the broker are gone with it
        time.sleep(1.0)  # ticks meanwhile: the agent keeps its shadow records in the outbox
        volatile_broker.start()
        client.close()
        client = Client(volatile_broker)
        wait_online(client, topic_prefix, "dev-s", 1)
        traffic(1.5)
        final = client.request(f"{topic_prefix}/dev-s/cmd/shadow", {"action": "stop"})
        assert final["ok"] and final["shadow"]["samples"] > 10, final
        assert agent.stop() == 0  # flushes the outbox
        deadline = time.monotonic() + 30
        while not any(
            r["kind"] == "shadow" and r["data"]["state"] == "stopped" for r in stored(store)
        ):
            assert time.monotonic() < deadline, "the last shadow record was not stored"
            time.sleep(0.3)
    finally:
        client.close()
        agent.stop()
        if sync.poll() is None:
            sync.kill()
            sync.wait()

    records = stored(store)
    per_boot = Counter((r["boot_id"], r["seq"]) for r in records)
    assert max(per_boot.values()) == 1, "a record stored twice"
    for boot in {b for b, _ in per_boot}:
        seqs = sorted(s for b, s in per_boot if b == boot)
        assert seqs == list(range(seqs[-1] + 1)), "a record lost"
    shadows = [r for r in records if r["kind"] == "shadow"]
    assert len(shadows) >= 5
    last = max(shadows, key=lambda r: r["seq"])["data"]
    assert last["state"] == "stopped" and last["samples"] == final["shadow"]["samples"]
    samples = [r["data"]["samples"] for r in sorted(shadows, key=lambda r: r["seq"])]
    assert samples == sorted(samples)  # cumulative: a later record never says less
