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
