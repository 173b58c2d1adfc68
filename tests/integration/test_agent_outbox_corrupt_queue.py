"""Rows a previous run left in the agent's outbox queue (``records``) that are not the records it
wrote: ``telemetry.db`` is local state that anything with access to the device's disk may alter,
and a disk fault may damage. On the previous code a body was put into its batch unparsed: one
that is not JSON made the whole batch invalid, the ingestion refused it (``schema``) without
acknowledging, the agent sent it again after every ack timeout and nothing after it arrived for
the rest of the boot; a NULL body raised TypeError in ``peek``. Here each such row is deleted and
counted (``dropped_corrupt``) the first time it is read, and every good record, those before and
after the holes it leaves included, is stored exactly once by the real ingestion (``edgebento
sync`` into moto's S3).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.store import ObjectStore, open_store
from edge_agent.outbox import Outbox
from tests.integration.test_ingest import start_sync
from tests.support.agent import Client, wait_for, wait_online
from tests.support.services import Mosquitto, MotoS3

pytestmark = pytest.mark.slow

OLD_BOOT = "b0ld"
GOOD = 12  # records of the previous boot, seq 0..GOOD + len(CORRUPT) - 1, corrupt ones between
# The body each corrupt row is given (SQL text, so a NULL and non-UTF-8 text can be stored).
CORRUPT = [
    "CAST('{not json' AS BLOB)",
    'CAST(\'{"kind": "event", "ts": 1, "data": {"n": \' || printf(\'%.5000c\', \'1\') || \'}}\' '
    "AS BLOB)",  # 5,000 digits
    "CAST(printf('%.5000c', '[') || printf('%.5000c', ']') AS BLOB)",  # deep nesting
    "CAST('[1, 2]' AS BLOB)",
    "NULL",
    "x'fffe00'",  # bytes that are not UTF-8
    "CAST(x'7b22ff22' AS TEXT)",  # text that is not UTF-8 (sqlite3 cannot even hand it back)
    "7",  # SQLite keeps what it is given: an integer in the BLOB column
]
# Among the good ones, at the start, in the middle (one and two in a row) and at the end.
CORRUPT_SEQS = [0, 3, 6, 7, 10, 14, 15, GOOD + len(CORRUPT) - 1]


def _seed(db: Path) -> list[int]:
    """A previous boot's queue with the corrupt rows in place of some records; the good seqs."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        # The queue table as an older or altered file may have it: no NOT NULL on body.
        conn.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, boot_id TEXT NOT NULL,"
            " seq INTEGER NOT NULL, size INTEGER NOT NULL, body BLOB)"
        )
    old = Outbox(db, "dev-a", 16 << 20, boot_id=OLD_BOOT)
    for n in range(GOOD + len(CORRUPT)):
        old.append("event", {"event": "kept", "n": n})
    old.close()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for seq, body in zip(CORRUPT_SEQS, CORRUPT, strict=True):
            conn.execute(f"UPDATE records SET body = {body} WHERE seq = ?", (seq,))
    return sorted(set(range(GOOD + len(CORRUPT))) - set(CORRUPT_SEQS))


def _stored(store: ObjectStore) -> list[dict[str, Any]]:
    return [r for key in store.list("telemetry/") for r in decode_jsonl_gz(store.get_bytes(key))]


@pytest.fixture
def synced(
    broker: Mosquitto, topic_prefix: str, s3_server: MotoS3, s3_bucket: str, tmp_path: Path
) -> Iterator[ObjectStore]:
    """``edgebento sync`` into moto's S3 for the test (killed after it); the store it writes."""
    url = f"s3://{s3_bucket}/fleet"
    sync = start_sync(broker, url, s3_server, topic_prefix, f"sync-{topic_prefix}", tmp_path / "s")
    try:
        yield open_store(url, endpoint_url=s3_server.endpoint_url)
    finally:
        sync.kill()
        sync.wait()


def test_corrupt_queued_rows_are_dropped_and_every_good_record_is_stored_once(
    agent_factory: Any, client: Client, synced: ObjectStore, pack_v1: Path, topic_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    data = tmp_path / "agent"
    data.mkdir()
    good = _seed(data / "telemetry.db")
    store = synced
    acks = client.collect(f"{topic_prefix}/dev-a/telemetry/ack")
    # No resend after an ack timeout within the test: the holes the deleted rows leave in
    # the old boot's seqs must not need one (the ingestion acknowledges up to a hole only).
    agent = agent_factory(pack=pack_v1, args=("--ack-timeout", "3600"))
    old = wait_for(acks, lambda a: a["boot_id"] == OLD_BOOT and a["seq"] >= good[-1], 120, agent)
    new = wait_for(acks, lambda a: a["boot_id"] != OLD_BOOT and a["seq"] >= 0, 120, agent)
    wait_online(client, topic_prefix, "dev-a")
    assert client.request(f"{topic_prefix}/dev-a/cmd/ping", {})["pong"] is True
    assert agent.stop() == 0
    assert old["seq"] == good[-1]  # the last row was corrupt: never sent, never acknowledged
    records = _stored(store)
    keys = Counter((r["boot_id"], r["seq"]) for r in records)
    assert sorted(s for b, s in keys if b == OLD_BOOT) == good  # none of the corrupt ones
    assert {s for b, s in keys if b == new["boot_id"]} >= set(range(new["seq"] + 1))
    assert max(keys.values()) == 1  # each stored once
    log = agent.output()
    assert log.count("in the outbox dropped") == len(CORRUPT), log[-3000:]
    assert "Traceback" not in log
    with contextlib.closing(sqlite3.connect(data / "telemetry.db")) as conn:
        (dropped,) = conn.execute("SELECT value FROM counters WHERE name = 'dropped_corrupt'")
        (old_left,) = conn.execute("SELECT COUNT(*) FROM records WHERE boot_id = ?", (OLD_BOOT,))
    assert (dropped[0], old_left[0]) == (len(CORRUPT), 0)
