from __future__ import annotations

import gzip
import itertools
import json
import time
from pathlib import Path
from typing import Any

from cloud_sync.parts import parse_range, stream_of
from edge_agent.capture import Capture


def test_capture_files_use_the_ingest_layout_in_a_stream_of_their_own(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    capture = Capture("cam-1", "b0ot", tmp_path, None, 1.0, 10_000, events.append)
    for i in range(4):
        capture.observe({"inputs": {"x": [[i]]}}, {"outputs": {"y": [[i]]}})
    shipped = capture.stop()["shipped"]
    assert len(shipped) == 1
    path = Path(shipped[0])
    key = path.relative_to(tmp_path).as_posix()
    records = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    assert [r["request"]["inputs"]["x"][0][0] for r in records] == [0, 1, 2, 3]
    ingest_stream = stream_of(
        {"kind": "capture", "ts": records[0]["ts"], "device": "cam-1", "boot_id": "b0ot"}
    )
    # Beside the capture records ingest writes for this device and day...
    assert key.startswith(f"capture/date={ingest_stream.date}/device=cam-1/")
    # ...but never under their stream prefix, where ingest would read the sample numbers as
    # telemetry seqs already stored.
    assert not key.startswith(ingest_stream.prefix)
    assert parse_range(key) == (1, 4)
    assert events[-1] == {
        "event": "capture",
        "samples": 4,
        "bytes": path.stat().st_size,
        "key": str(path),
    }


def test_a_full_buffer_ships_and_numbering_continues(tmp_path: Path) -> None:
    capture = Capture("cam-1", "b0ot", tmp_path, None, 1.0, 200, lambda _event: None)
    for i in range(6):
        capture.observe({"inputs": {"x": [[i]]}}, {"ok": True})
    capture.stop()

    def spans() -> list[tuple[int, int]]:
        return sorted(span for k in capture.shipped if (span := parse_range(k)) is not None)

    deadline = time.monotonic() + 10
    while sum(b - a + 1 for a, b in spans()) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)  # full buffers ship on threads of their own
    got = spans()
    assert len(got) == len(capture.shipped) > 1  # 200 bytes do not hold six samples
    assert got[0][0] == 1 and got[-1][1] == 6
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(got))
