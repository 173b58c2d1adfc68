"""The outbox's aside table (records over a broker's packet limit, kept for when it rises): its
bound drops records only counted and logged, the agent's own set-aside events before real
records, and a record queued again leaves the table in the same transaction."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent.outbox import ASIDE_KEPT, Outbox


def _set_aside_all(outbox: Outbox) -> None:
    for p in outbox.peek(0, 10 * ASIDE_KEPT):
        outbox.set_aside(p.id)


def test_records_evicted_past_the_aside_cap_are_counted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "telemetry.db", "dev-r", 64 << 20)
    for i in range(ASIDE_KEPT + 1):
        outbox.append("capture", {"i": i})
    before = sum(outbox.counters().values())
    _set_aside_all(outbox)
    restored = outbox.restore_aside()
    dropped = sum(outbox.counters().values()) - before
    assert restored + dropped == ASIDE_KEPT + 1, (restored, outbox.counters())
    assert outbox.counters()["dropped_aside"] == 1 and outbox.stats()["dropped_aside"] == 1


def test_the_agents_set_aside_events_are_evicted_before_real_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "telemetry.db", "dev-r", 64 << 20)
    for i in range(ASIDE_KEPT):
        outbox.append("capture", {"i": i})
    event = {"event": "telemetry_set_aside", "seq": 3, "kind": "capture", "kept": True}
    event_seq = outbox.append("event", event)
    with caplog.at_level(logging.WARNING, logger="edge_agent.outbox"):
        _set_aside_all(outbox)  # the event last: the newest
    assert outbox.restore_aside() == ASIDE_KEPT
    kept = [p.body for p in outbox.peek(0, 2 * ASIDE_KEPT)]
    assert sum(b'"kind":"capture","data"' in body for body in kept) == ASIDE_KEPT  # every one
    assert not any(b"telemetry_set_aside" in body for body in kept)
    assert outbox.counters()["dropped_aside"] == 1
    assert f"telemetry record {event_seq} set aside earlier dropped" in caplog.text


def test_a_record_queued_again_is_stored_once_when_its_aside_row_cannot_go(
    tmp_path: Path,
) -> None:
    """A fault between storing the record and deleting its aside row (a trigger whose own
    delete fails: its table does not exist) leaves neither change: queued again later, it is stored once, not twice."""
    path = tmp_path / "telemetry.db"
    outbox = Outbox(path, "dev-r", 64 << 20)
    outbox.append("capture", {"i": 0})
    _set_aside_all(outbox)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TRIGGER refuse BEFORE DELETE ON aside BEGIN DELETE FROM gone; END")
    assert outbox.restore_aside() == 0
    other.execute("DROP TRIGGER refuse")
    other.close()
    assert outbox.restore_aside() == 1 and outbox.restore_aside() == 0
    assert [p.seq for p in outbox.peek(0, 10)] == [1] and outbox.count == 1
