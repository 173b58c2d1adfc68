from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.parts import (
    MAX_PART_BYTES,
    MAX_PART_GZIP_BYTES,
    RangeSet,
    decode_jsonl_gz,
    encode_jsonl_gz,
    encode_parts,
    group_runs,
    parse_range,
    read_part,
    safe_id,
)
from cloud_sync.store import LocalStore
from modelpack.errors import StoreError
from tests.support.zipbomb import gzip_bomb

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


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    part_bytes=st.integers(1, 2000),
)
def test_parts_hold_at_most_part_bytes_and_together_the_whole_run(
    sizes: list[int], part_bytes: int
) -> None:
    records = [{**rec(i), "data": {"x": "é" * n}} for i, n in enumerate(sizes)]
    (run,) = group_runs(records)
    parts = list(encode_parts(run, part_bytes))
    assert [r for part, _ in parts for r in part.records] == records
    for part, data in parts:
        inflated = gzip.decompress(data)
        assert len(inflated) <= part_bytes or len(part.records) == 1
        assert decode_jsonl_gz(data) == list(part.records)
        assert parse_range(part.key) == (part.first, part.last)
        assert part.last - part.first + 1 == len(part.records)


def test_a_gzip_bomb_is_refused_before_it_is_inflated_past_the_cap() -> None:
    bomb = gzip_bomb(2, b'{"seq": 1}\n')  # 128 MiB of zeros
    with pytest.raises(StoreError, match="inflates past the cap of 67108864 bytes"):
        decode_jsonl_gz(bomb)
    assert MAX_PART_BYTES == 64 << 20
    with pytest.raises(StoreError, match="past the cap of 10 bytes"):
        decode_jsonl_gz(encode_jsonl_gz([rec(1)]), max_bytes=10)


def test_members_are_read_as_gzip_reads_them_and_a_cut_one_is_refused() -> None:
    one, two = encode_jsonl_gz([rec(1)]), encode_jsonl_gz([rec(2)])
    assert decode_jsonl_gz(one + two) == [rec(1), rec(2)]
    assert decode_jsonl_gz(b"") == []
    with pytest.raises(StoreError, match="cut short"):
        decode_jsonl_gz(one[:-3])
    with pytest.raises(StoreError, match="not gzipped JSON lines"):
        decode_jsonl_gz(b"not gzip at all")


def test_an_object_over_the_compressed_cap_is_not_read_whole(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    key = "telemetry/date=2025-06-15/device=d1/part-b1-000000000001-000000000001.jsonl.gz"
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(bytes(MAX_PART_GZIP_BYTES + 1))
    with pytest.raises(StoreError, match="over 68157440 bytes"):
        read_part(store, key)
    store.put_bytes(key, encode_jsonl_gz([rec(1)]))
    assert read_part(store, key) == [rec(1)]
