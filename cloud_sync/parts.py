"""Telemetry objects in the store: keys, grouping into contiguous seq runs, and encoding.

One object holds one contiguous run of one boot of one device on one UTC day::

    telemetry/date=YYYY-MM-DD/device=ID/part-{boot_id}-{first_seq:012d}-{last_seq:012d}.jsonl.gz
    capture/date=YYYY-MM-DD/device=ID/part-...jsonl.gz        (records of kind "capture")
    drift/date=YYYY-MM-DD/device=ID/part-...jsonl.gz          (records of kind "drift")

Because a key is derived from ``(device, boot_id, seq range)`` and the bytes are deterministic
(gzip mtime 0, sorted JSON keys), writing a run again overwrites the same object with the same
bytes instead of adding a duplicate. Runs are contiguous, so a key's range says exactly which
seqs the object holds, which is what deduplication against the store relies on.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelpack import untrusted_json
from modelpack.errors import StoreError

TELEMETRY_ROOT = "telemetry"
CAPTURE_ROOT = "capture"
DRIFT_ROOT = "drift"  # drift summaries apart, so ``edgebento monitor`` reads only them
_ROOTS = {"capture": CAPTURE_ROOT, "drift": DRIFT_ROOT}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PART = re.compile(r"part-(?P<boot>.+)-(?P<first>\d{12})-(?P<last>\d{12})\.jsonl\.gz$")


def safe_id(value: str) -> bool:
    """Device and boot ids become key parts: no '/', no '..', nothing odd."""
    return bool(_SAFE_ID.match(value)) and ".." not in value


@dataclass(frozen=True)
class Stream:
    """Where one device's records of one boot on one day go."""

    root: str
    date: str
    device: str
    boot_id: str

    @property
    def prefix(self) -> str:
        return f"{self.root}/date={self.date}/device={self.device}/part-{self.boot_id}-"

    def key(self, first: int, last: int) -> str:
        return f"{self.prefix}{first:012d}-{last:012d}.jsonl.gz"


@dataclass(frozen=True)
class Run:
    stream: Stream
    first: int
    last: int
    records: tuple[dict[str, Any], ...]

    @property
    def key(self) -> str:
        return self.stream.key(self.first, self.last)


def stream_of(record: dict[str, Any]) -> Stream:
    day = datetime.fromtimestamp(float(record["ts"]), UTC).strftime("%Y-%m-%d")
    root = _ROOTS.get(str(record.get("kind")), TELEMETRY_ROOT)
    return Stream(root, day, str(record["device"]), str(record["boot_id"]))


def parse_range(key: str) -> tuple[int, int] | None:
    match = _PART.search(key)
    return (int(match["first"]), int(match["last"])) if match else None


def group_runs(records: Iterable[dict[str, Any]]) -> list[Run]:
    """Records into contiguous runs per stream; a seq seen twice is kept once."""
    by_stream: dict[Stream, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        by_stream[stream_of(record)].setdefault(int(record["seq"]), record)
    runs: list[Run] = []
    for stream, by_seq in by_stream.items():
        current: list[dict[str, Any]] = []
        for seq in sorted(by_seq):
            if current and seq != int(current[-1]["seq"]) + 1:
                runs.append(_run(stream, current))
                current = []
            current.append(by_seq[seq])
        if current:
            runs.append(_run(stream, current))
    return runs


def _run(stream: Stream, records: list[dict[str, Any]]) -> Run:
    return Run(stream, int(records[0]["seq"]), int(records[-1]["seq"]), tuple(records))


def encode_jsonl_gz(records: Iterable[dict[str, Any]]) -> bytes:
    lines = "".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), default=str) + "\n" for r in records
    )
    return gzip.compress(lines.encode(), compresslevel=6, mtime=0)


def decode_jsonl_gz(data: bytes, what: str = "the telemetry object") -> list[dict[str, Any]]:
    """The records of an object ``encode_jsonl_gz`` wrote, or StoreError: a bucket writer can
    put anything under these keys, and each reader skips (and counts) what it cannot read."""
    try:
        lines = gzip.decompress(data).decode().splitlines()
        records = [untrusted_json.loads(line, what) for line in lines if line]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, untrusted_json.NotJsonError) as exc:
        raise StoreError(f"{what} is not gzipped JSON lines: {exc}") from exc
    if not all(isinstance(r, dict) for r in records):
        raise StoreError(f"{what} holds a line that is not a JSON object")
    return records


class RangeSet:
    """Closed integer intervals, merged as they are added (the seqs stored for one stream)."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def add(self, first: int, last: int) -> None:
        spans = [*self.spans, (first, last)]
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.spans = merged

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and any(lo <= seq <= hi for lo, hi in self.spans)

    @property
    def high(self) -> int:
        return self.spans[-1][1] if self.spans else -1
