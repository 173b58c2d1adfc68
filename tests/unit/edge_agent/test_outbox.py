from __future__ import annotations

import json
import random
from pathlib import Path

from edge_agent.outbox import Outbox, batch_payload
from edge_agent.session import Backoff


def _records(outbox: Outbox) -> list[dict]:
    """Every record, oldest first (a peek returns one boot's records at a time)."""
    out, after = [], 0
    while batch := outbox.peek(after, 10_000):
        out += [json.loads(p.body) for p in batch]
        after = batch[-1].id
    return out


def test_seq_rises_by_one_and_survives_a_reopen_with_a_new_boot(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    assert [box.append("heartbeat", {"i": i}) for i in range(3)] == [0, 1, 2]
    first_boot = box.boot_id
    box.close()
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    assert box.boot_id != first_boot and box.count == 3
    assert box.append("heartbeat", {}) == 0
    records = _records(box)
    assert [(r["boot_id"] == first_boot, r["seq"]) for r in records] == [
        (True, 0),
        (True, 1),
        (True, 2),
        (False, 0),
    ]
    assert records[0]["device"] == "dev" and records[0]["schema_version"] == 1


def test_acknowledged_records_leave_and_the_batch_is_a_telemetry_batch(tmp_path: Path) -> None:
    from cloud_sync.protocol import TelemetryBatch

    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    for i in range(5):
        box.append("event", {"i": i})
    pending = box.peek(0, 3)
    batch = TelemetryBatch.model_validate_json(batch_payload(pending))
    assert [r.seq for r in batch.records] == [0, 1, 2]
    box.ack([p.id for p in pending])
    assert box.count == 2 and [r["seq"] for r in _records(box)] == [3, 4]
    assert box.bytes == sum(len(p.body) for p in box.peek(0, 10))


def test_drop_oldest_evicts_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev", 4096, "drop_oldest")
    for i in range(100):
        assert box.append("event", {"i": i, "pad": "x" * 100}) == i
    assert box.bytes <= 4096
    kept = [r["seq"] for r in _records(box)]
    assert kept == list(range(kept[0], 100))  # the newest, contiguous
    assert box.counters()["evicted"] == 100 - len(kept)


def test_drop_newest_refuses_without_taking_a_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev", 4096, "drop_newest")
    results = [box.append("event", {"i": i, "pad": "x" * 100}) for i in range(100)]
    stored = [r for r in results if r is not None]
    assert stored == list(range(len(stored)))
    assert box.counters()["dropped_overflow"] == 100 - len(stored)
    box.ack([p.id for p in box.peek(0, 5)])
    assert box.append("event", {}) == len(stored)  # no hole in the numbering


def test_backoff_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(0.5, 8.0, random.Random(1))
    delays = [backoff.next() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert len(set(delays)) == len(delays)  # jittered
    assert max(delays[6:]) > 2.0  # grew
    backoff.reset()
    assert backoff.next() <= 0.5


def test_an_ack_deletes_its_boot_up_to_its_seq_and_the_floor_rises(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    for i in range(3):
        box.append("event", {"i": i})
    old = box.boot_id
    box.close()
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    for i in range(5):
        box.append("event", {"i": i})
    assert {p.boot_id for p in box.peek(0, 100)} == {old}  # one boot per batch
    assert box.ack_upto(box.boot_id, 2) == 3  # only the current boot's 0..2
    assert box.floor(box.boot_id) == 3 and box.floor(old) == 0
    assert box.ack_upto(old, 10) == 3 and box.count == 2
    batch = box.peek(0, 100)
    from cloud_sync.protocol import TelemetryBatch

    doc = TelemetryBatch.model_validate_json(batch_payload(batch, box.floor(box.boot_id)))
    assert doc.floor == 3 and [r.seq for r in doc.records] == [3, 4]


def test_a_corrupt_outbox_is_quarantined_and_the_agent_starts(tmp_path: Path) -> None:
    (tmp_path / "o.db").write_bytes(b"\x00garbage" * 1000)
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    assert len(box.quarantined) == 1 and box.quarantined[0].exists()
    assert box.append("event", {}) == 0 and box.counters()["quarantined"] == 1


def test_an_outbox_damaged_while_the_agent_runs_is_quarantined_and_writing_goes_on(
    tmp_path: Path,
) -> None:
    """The file is damaged under a running agent (a failing card, a stray write): the next
    read that meets it quarantines the file and the outbox starts a new one, without raising."""
    path = tmp_path / "o.db"
    box = Outbox(path, "dev", 64 << 20)
    for i in range(400):
        box.append("event", {"i": i, "pad": "x" * 20000})  # 8 MB: past SQLite's page cache
    box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as fh:  # garbage over the middle of the file, under the open handle
        fh.seek(size // 3)
        fh.write(b"\xde\xad\xbe\xef" * (size // 12))
    reads = [box.peek(0, 1000), box.floor(box.boot_id), box.count_upto(1 << 30), box.counters()]
    assert len(box.quarantined) == 1 and box.quarantined[0].exists()
    assert reads[0] == [] or all(p.boot_id == box.boot_id for p in reads[0])
    seq = box.append("event", {"after": True})
    assert seq >= 0 and [p.seq for p in box.peek(0, 10)] == [seq]
    assert box.counters()["quarantined"] == 1


def test_a_record_set_aside_under_a_learned_bound_is_kept_and_queued_again_at_restart(
    tmp_path: Path,
) -> None:
    """Over a packet bound learned from the broker's drops (which may be false: a flaky link),
    a record leaves the queue so it blocks nothing behind it, but is kept on disk: after a
    restart it is queued again as a record of the new boot (the old code deleted it)."""
    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)
    for i in range(3):
        box.append("event", {"i": i, "pad": "x" * (5000 if i == 1 else 10)}, ts=100.0 + i)
    big = next(p for p in box.peek(0, 10) if p.seq == 1)
    box.set_aside(big.id)
    assert [r["seq"] for r in _records(box)] == [0, 2] and box.count == 2
    assert box.ack_upto(box.boot_id, 2) == 2 and box.count == 0  # the rest arrived
    box.close()

    box = Outbox(tmp_path / "o.db", "dev", 1 << 20)  # the agent restarted: no bound now
    assert box.restore_aside() == 1 and box.restore_aside() == 0
    (again,) = _records(box)
    assert again["data"] == {"i": 1, "pad": "x" * 5000} and again["ts"] == 101.0
    assert again["boot_id"] == box.boot_id and again["seq"] == 0 and box.count == 1
