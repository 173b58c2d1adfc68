"""Queued rows a previous run left in the outbox file are checked once, the first time they are
read: one that is not a record the ingestion takes is deleted and counted, and every batch the
outbox hands out parses as a TelemetryBatch (on the previous code one bad body made its batch
invalid JSON, and a NULL body raised TypeError in ``peek``)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import TelemetryBatch
from edge_agent.outbox import Outbox, batch_payload

BOOT = "b0ld"


def _record(at: int, **change: object) -> str:
    doc = {"schema_version": 1, "device": "dev", "boot_id": BOOT, "seq": at, "ts": 1e9,
           "kind": "event", "data": {}, **change}  # fmt: skip
    return f"CAST({_sql_text(json.dumps(doc))} AS BLOB)"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Each a function of the row's seq giving the SQL value stored as its body.
CORRUPT = {
    "not json": lambda seq: "CAST('{not json' AS BLOB)",
    "5,000 digits": lambda seq: "CAST(printf('%.5000c', '1') AS BLOB)",
    "deep nesting": lambda seq: "CAST(printf('%.5000c', '[') || printf('%.5000c', ']') AS BLOB)",
    "a list": lambda seq: "CAST('[1, 2]' AS BLOB)",
    "NULL": lambda seq: "NULL",
    "not UTF-8": lambda seq: "x'fffe00'",
    "text not UTF-8": lambda seq: "CAST(x'7b22ff22' AS TEXT)",
    "an integer": lambda seq: "7",
    "text": lambda seq: _record(seq).replace("AS BLOB", "AS TEXT"),
    "another seq": lambda seq: _record(seq + 1000),
    "another boot": lambda seq: _record(seq, boot_id="b0ther"),
    "another device": lambda seq: _record(seq, device="dev-b"),
    "a kind the ingestion refuses": lambda seq: _record(seq, kind="Not A Kind"),
    "ts not finite": lambda seq: _record(seq).replace("1000000000.0", "1e999"),
    "a bool seq": lambda seq: _record(seq, seq=True),  # True == 1 in Python
}


def _seed(db: Path, bodies: list[str | None]) -> None:
    """A previous boot's queue: a record the agent wrote where ``None``, else that SQL body."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, boot_id TEXT NOT NULL,"
            " seq INTEGER NOT NULL, size INTEGER NOT NULL, body BLOB)"
        )
    old = Outbox(db, "dev", 1 << 22, boot_id=BOOT)
    for n in range(len(bodies)):
        old.append("event", {"n": n}, ts=1e9)
    old.close()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for seq, body in enumerate(bodies):
            if body is not None:
                conn.execute(f"UPDATE records SET body = {body} WHERE seq = ?", (seq,))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.none() | st.sampled_from(sorted(CORRUPT)), min_size=1, max_size=30),
    limits=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    after_new=st.integers(0, 3),
)
def test_every_batch_parses_and_only_the_good_records_leave(
    tmp_path_factory: object, rows: list[str | None], limits: list[int], after_new: int
) -> None:
    db = tmp_path_factory.mktemp("o") / "telemetry.db"  # type: ignore[attr-defined]
    _seed(db, [None if r is None else CORRUPT[r](seq) for seq, r in enumerate(rows)])
    box = Outbox(db, "dev", 1 << 22)
    for n in range(after_new):  # this run's own records, behind the old ones
        box.append("heartbeat", {"n": n})
    seen: list[tuple[str, int]] = []
    after, turn = 0, 0
    while batch := box.peek(after, limits[turn % len(limits)]):
        turn += 1
        parsed = TelemetryBatch.model_validate_json(
            batch_payload(batch, box.floor(batch[0].boot_id))
        )
        seen += [(r.boot_id, r.seq) for r in parsed.records]
        after = batch[-1].id
    good = [(BOOT, seq) for seq, r in enumerate(rows) if r is None]
    assert seen == good + [(box.boot_id, n) for n in range(after_new)]
    assert box.counters()["dropped_corrupt"] == len(rows) - len(good)
    assert box.count == len(seen)
    box.close()


def test_an_acknowledgement_that_stops_before_a_deleted_seq_is_a_hole(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    _seed(db, [None, None, "NULL", "7", None, None])
    box = Outbox(db, "dev", 1 << 20)
    assert [p.seq for p in box.peek(0, 10)] == [0, 1, 4, 5]
    assert box.holes.stops_at(BOOT, 1)  # the ingestion waits at 2: send again under floor 4
    assert not box.holes.stops_at(BOOT, 1)  # said once
    assert not box.holes.stops_at(BOOT, 5)
    assert not box.holes


def test_a_batch_names_the_holes_between_its_floor_and_its_last_record(tmp_path: Path) -> None:
    """Previous code: batches named no hole, so each one cost a round trip (and a resend of the
    window); here the batch's skip lets the ingestion acknowledge past them at once."""
    db = tmp_path / "telemetry.db"
    _seed(db, [None, "NULL", None, "7", None, None])
    box = Outbox(db, "dev", 1 << 20)
    batch = box.peek(0, 10)
    assert [p.seq for p in batch] == [0, 2, 4, 5]
    floor = box.floor(BOOT)
    assert floor == 0 and box.holes.between(BOOT, 0, 2) == [1]
    skip = box.holes.between(BOOT, floor, batch[-1].seq)
    doc = TelemetryBatch.model_validate_json(batch_payload(batch, floor, skip))
    assert doc.skip == [1, 3] and [r.seq for r in doc.records] == [0, 2, 4, 5]
    box.holes.named(BOOT, skip)
    assert not box.holes.stops_at(BOOT, 0)  # the batch named it: its own ack goes past
    assert box.holes.between(BOOT, 0, 5) == [3]  # 1 reached
    assert not box.holes.stops_at(BOOT, 5) and not box.holes  # 3 passed
    box.holes.mark(BOOT, 9)  # past the boot's last row: forgotten once the boot is done
    box.holes.forget(BOOT)
    assert not box.holes
    box.close()
