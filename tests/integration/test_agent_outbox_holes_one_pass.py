"""Many holes in a previous boot's seqs (every other queued row corrupt, deleted when first
read): each batch names the holes between its floor and its last record (``skip``), so the real
ingestion (``edgebento sync`` into moto's S3) acknowledges past them at once and the agent sends
the boot about once. Previous code: each hole cost a round trip, and each resend at a hole sent
the whole unacknowledged window again (300 good records took tens of thousands of records sent).
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.store import ObjectStore
from edge_agent.outbox import Outbox
from tests.integration.test_agent_outbox_corrupt_queue import synced  # noqa: F401 (a fixture)
from tests.support.agent import Client, wait_for

pytestmark = pytest.mark.slow

OLD_BOOT = "b0ld"
ROWS = 600  # seq 0..599 of the previous boot: the odd ones corrupt


def _seed(db: Path) -> list[int]:
    old = Outbox(db, "dev-a", 64 << 20, boot_id=OLD_BOOT)
    for n in range(ROWS):
        old.append("event", {"event": "kept", "n": n})
    old.close()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE records SET body = CAST('{not json' AS BLOB) WHERE seq % 2 = 1")
    return list(range(0, ROWS, 2))


def _old_records_sent(sent: queue.Queue[mqtt.MQTTMessage]) -> tuple[int, int]:
    """Batches and records of the previous boot that went over the broker."""
    batches = records = 0
    while True:
        try:
            msg = sent.get_nowait()
        except queue.Empty:
            return batches, records
        old = [r for r in json.loads(msg.payload)["records"] if r["boot_id"] == OLD_BOOT]
        batches, records = batches + bool(old), records + len(old)


def test_a_boot_full_of_holes_is_sent_about_once(
    agent_factory: Any, client: Client, synced: ObjectStore, pack_v1: Path, topic_prefix: str,  # noqa: F811
    tmp_path: Path,
) -> None:  # fmt: skip
    (tmp_path / "agent").mkdir()
    good = _seed(tmp_path / "agent" / "telemetry.db")
    acks = client.collect(f"{topic_prefix}/dev-a/telemetry/ack")
    sent = client.collect(f"{topic_prefix}/dev-a/telemetry")
    agent = agent_factory(pack=pack_v1, args=("--ack-timeout", "3600"))
    old = wait_for(acks, lambda a: a["boot_id"] == OLD_BOOT and a["seq"] >= good[-1], 180, agent)
    assert agent.stop() == 0
    assert old["seq"] == good[-1]
    batches, records = _old_records_sent(sent)
    # One pass: each good record sent about once (no resend of the window at each hole).
    assert records < 2 * len(good), (batches, records)
    store = synced
    stored = [r for k in store.list("telemetry/") for r in decode_jsonl_gz(store.get_bytes(k))]
    keys = Counter((r["boot_id"], r["seq"]) for r in stored)
    assert sorted(s for b, s in keys if b == OLD_BOOT) == good
    assert max(keys.values()) == 1
