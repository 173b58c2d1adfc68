from __future__ import annotations

from typing import Any

from cloud_sync.parts import (
    RangeSet,
    decode_jsonl_gz,
    encode_jsonl_gz,
    group_runs,
    parse_range,
    safe_id,
)

TS = 1_750_000_000.0  # 2025-06-15 UTC


def rec(seq: int, device: str = "d1", boot: str = "b1", kind: str = "heartbeat") -> dict[str, Any]:
    return {"device": device, "boot_id": boot, "seq": seq, "ts": TS + seq, "kind": kind}


def test_runs_are_contiguous_deduplicated_and_keyed_by_range() -> None:
    records = [rec(s) for s in (3, 1, 2, 2, 7, 8)] + [rec(0, device="d2")]
    runs = group_runs(records)
    spans = sorted((r.stream.device, r.first, r.last, len(r.records)) for r in runs)
    assert spans == [("d1", 1, 3, 3), ("d1", 7, 8, 2), ("d2", 0, 0, 1)]
    key = next(r.key for r in runs if r.first == 1)
    assert key == ("telemetry/date=2025-06-15/device=d1/part-b1-000000000001-000000000003.jsonl.gz")
    assert parse_range(key) == (1, 3)


def test_captures_go_beside_telemetry() -> None:
    (run,) = group_runs([rec(5, kind="capture")])
    assert run.key.startswith("capture/date=2025-06-15/device=d1/")


def test_encoding_is_deterministic_so_a_rewrite_is_identical() -> None:
    records = [rec(1), rec(2)]
    data = encode_jsonl_gz(records)
    assert data == encode_jsonl_gz([dict(reversed(list(r.items()))) for r in records])
    assert decode_jsonl_gz(data) == records


def test_range_set_merges_adjacent_spans() -> None:
    ranges = RangeSet()
    ranges.add(10, 19)
    ranges.add(0, 9)
    ranges.add(30, 31)
    assert ranges.spans == [(0, 19), (30, 31)] and ranges.high == 31
    assert 15 in ranges and 25 not in ranges


def test_ids_with_slashes_or_dots_are_not_safe() -> None:
    assert safe_id("dev-1.a_b:c")
    assert not safe_id("a/b") and not safe_id("..") and not safe_id("a..b") and not safe_id("")
