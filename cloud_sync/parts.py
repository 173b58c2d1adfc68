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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelpack import untrusted_json
from modelpack.errors import SizeLimitError, StoreError

TELEMETRY_ROOT = "telemetry"
CAPTURE_ROOT = "capture"
DRIFT_ROOT = "drift"  # drift summaries apart, so ``edgebento monitor`` reads only them
# A part is one stream's records of one flush, split by ``encode_parts`` at PART_BYTES of JSON
# lines. A record alone can be longer: a telemetry message is at most 4 MiB (SyncOptions), and
# json.dumps's \u escapes make a record's line at most 3x its UTF-8 text (12 MiB). Readers
# take four times PART_BYTES (room for a record from a sync run whose message cap was raised
# five-fold): a part a bucket writer planted past that is skipped, never inflated whole. Stored
# deflate blocks add 5 bytes per 64 KiB, so its gzip is never over 1 MiB bigger.
PART_BYTES = 16 << 20
MAX_PART_BYTES = 4 * PART_BYTES
MAX_PART_GZIP_BYTES = MAX_PART_BYTES + (1 << 20)
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
    return gzip.compress(b"".join(_line(r) for r in records), compresslevel=6, mtime=0)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()


def encode_parts(run: Run, part_bytes: int = PART_BYTES) -> Iterator[tuple[Run, bytes]]:
    """``run`` as objects of at most ``part_bytes`` of JSON lines each (a record longer than
    that alone), each a contiguous run of its own with its own key: what a reader may inflate
    is bounded by what was written, not by how long a device stayed offline."""
    lines: list[bytes] = []
    size = 0
    first = 0
    for i, line in enumerate(_line(r) for r in run.records):
        if lines and size + len(line) > part_bytes:
            yield _part(run, first, i, lines)
            lines, size, first = [], 0, i
        lines.append(line)
        size += len(line)
    if lines:
        yield _part(run, first, len(run.records), lines)


def _part(run: Run, start: int, stop: int, lines: list[bytes]) -> tuple[Run, bytes]:
    part = _run(run.stream, list(run.records[start:stop]))
    return part, gzip.compress(b"".join(lines), compresslevel=6, mtime=0)


def read_part(store: Any, key: str) -> list[dict[str, Any]]:
    """The records of the telemetry object at ``key``, or StoreError: one over the caps (read
    at most ``MAX_PART_GZIP_BYTES`` + 1 bytes, inflated at most ``MAX_PART_BYTES`` + 1) costs
    what a part the ingestion writes may, and is skipped like any unreadable object."""
    try:
        data = store.get_bytes(key, max_bytes=MAX_PART_GZIP_BYTES)
    except SizeLimitError as exc:
        raise StoreError(f"{key} is not a telemetry object: {exc}") from exc
    return decode_jsonl_gz(data, key)


def decode_jsonl_gz(
    data: bytes, what: str = "the telemetry object", max_bytes: int = MAX_PART_BYTES
) -> list[dict[str, Any]]:
    """The records of an object ``encode_jsonl_gz`` wrote, or StoreError: a bucket writer can
    put anything under these keys, and each reader skips (and counts) what it cannot read,
    a gzip bomb included: nothing is inflated past ``max_bytes`` + 1 bytes."""
    try:
        text = _inflate(data, max_bytes, what).decode()
        records = [untrusted_json.loads(line, what) for line in text.splitlines() if line]
    except (zlib.error, UnicodeDecodeError, untrusted_json.NotJsonError) as exc:
        raise StoreError(f"{what} is not gzipped JSON lines: {exc}") from exc
    if not all(isinstance(r, dict) for r in records):
        raise StoreError(f"{what} holds a line that is not a JSON object")
    return records


def _inflate(data: bytes, max_bytes: int, what: str) -> bytearray:
    """Every gzip member of ``data`` (as ``gzip.decompress`` takes them), inflated no further
    than ``max_bytes`` + 1 bytes: zlib stops there and keeps the rest of the input unread."""
    out = bytearray()
    rest = data
    while rest:
        inflater = zlib.decompressobj(wbits=31)
        out += inflater.decompress(rest, max_bytes + 1 - len(out))
        if len(out) > max_bytes:
            raise StoreError(f"{what} inflates past the cap of {max_bytes} bytes")
        if not inflater.eof:  # the output had room left, so the input ran out: cut short
            raise StoreError(f"{what} is not gzipped JSON lines: the gzip stream is cut short")
        rest = inflater.unused_data
    return out


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
