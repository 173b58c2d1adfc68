"""Parsing and deduplication of telemetry, on a local store (the MQTT side is integration)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.ingest import TelemetrySync, parse_batch
from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.protocol import Topics
from cloud_sync.store import LocalStore
from modelpack.errors import ProtocolError

TOPICS = Topics("fleet")


def recs(seqs: range, device: str = "d1") -> list[dict[str, Any]]:
    return [
        {
            "schema_version": 1,
            "device": device,
            "boot_id": "b1",
            "seq": s,
            "ts": time.time(),
            "kind": "heartbeat",
            "data": {},
        }
        for s in seqs
    ]


def payload(records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schema_version": 1, "records": records}).encode()


def test_parse_batch_refuses_what_breaks_the_protocol() -> None:
    assert len(parse_batch(TOPICS, "fleet/d1/telemetry", payload(recs(range(3))))) == 3
    with pytest.raises(ProtocolError, match="record of device 'd2'"):
        parse_batch(TOPICS, "fleet/d1/telemetry", payload(recs(range(1), device="d2")))
    with pytest.raises(ProtocolError, match="records"):
        parse_batch(TOPICS, "fleet/d1/telemetry", b'{"schema_version": 1}')
    with pytest.raises(ProtocolError):
        parse_batch(TOPICS, "fleet/d1/telemetry", b"not json")
    bad = recs(range(1))
    bad[0]["boot_id"] = "../../etc"
    with pytest.raises(ProtocolError, match="plain name"):
        parse_batch(TOPICS, "fleet/d1/telemetry", payload(bad))


def stored(store: LocalStore) -> list[int]:
    return sorted(
        r["seq"] for k in store.list("telemetry/") for r in decode_jsonl_gz(store.get_bytes(k))
    )


def test_redelivery_to_another_process_adds_no_duplicate(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    one = TelemetrySync(store, "mqtt://127.0.0.1:1", topics=TOPICS)
    two = TelemetrySync(store, "mqtt://127.0.0.1:1", topics=TOPICS)
    assert one._write(recs(range(0, 10))) == 10
    assert two._write(recs(range(5, 15))) == 5  # first sight: lists, 5..9 are stored already
    assert one._write(recs(range(15, 20))) == 5  # a gap: 'one' lists and learns of 10..14
    assert one._write(recs(range(0, 20))) == 0  # a full replay writes nothing
    assert one._write(recs(range(20, 25))) == 5  # contiguous: no listing needed
    assert stored(store) == list(range(25))
    assert two.metrics.duplicates._value.get() == 5


class FlakyStore(LocalStore):
    """A real local store whose first ``fail`` writes fail, as S3 does when it throttles."""

    def __init__(self, root: Path, fail: int) -> None:
        super().__init__(root)
        self.fail = fail

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.fail:
            self.fail -= 1
            from modelpack.errors import StoreError

            raise StoreError("SlowDown: please reduce your request rate")
        super().put_bytes(key, data)


def test_a_failed_flush_keeps_its_buffer_and_the_next_one_writes_it(tmp_path: Path) -> None:
    from cloud_sync.ingest import _Pending

    store = FlakyStore(tmp_path, fail=2)
    sync = TelemetrySync(store, "mqtt://127.0.0.1:1", topics=TOPICS)
    sync._buffer.append(_Pending(1, 0, 0, recs(range(5)), boots={("d1", "b1"): 0}))
    assert sync.flush() == 0 and len(sync._buffer) == 1  # kept, not dropped
    assert sync.flush() == 0 and len(sync._buffer) == 1
    assert sync.flush() == 5 and not sync._buffer
    assert stored(store) == list(range(5))
    assert sync.metrics.upload_failures._value.get() == 2
    assert sync.tracker.ack(("d1", "b1")) == 4


def test_the_ack_never_runs_ahead_of_a_gap_and_starts_at_the_floor(tmp_path: Path) -> None:
    sync = TelemetrySync(LocalStore(tmp_path), "mqtt://127.0.0.1:1", topics=TOPICS)
    sync._write(recs(range(0, 5)))
    sync._write(recs(range(8, 10)))  # 5..7 lost on the way
    assert sync.tracker.ack(("d1", "b1")) == 4
    sync.tracker.floor(("d1", "b1"), 6)  # the device evicted 5 itself; 6 and 7 it still holds
    assert sync.tracker.ack(("d1", "b1")) == 5
    sync._write(recs(range(6, 8)))
    assert sync.tracker.ack(("d1", "b1")) == 9
