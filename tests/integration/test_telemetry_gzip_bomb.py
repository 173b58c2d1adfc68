"""A gzip bomb planted in the bucket as a telemetry or drift part: about 2 MB that inflate to
2 GiB of zeros. On the previous code ``gzip.decompress`` inflated it whole (then decoded and
split it: several GiB) in ``edgebento monitor`` and ``fleet status --store``; here the reader
stops at ``parts.MAX_PART_BYTES`` and skips the object like any unreadable one. The CLI runs
in its own process under a small parent that reports the child's peak RSS (``ru_maxrss`` of
RUSAGE_CHILDREN), so the bound is on memory, never on time.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloud_sync.parts import MAX_PART_BYTES
from tests.support.cli_run import REPO
from tests.support.services import Mosquitto, MotoS3
from tests.support.zipbomb import gzip_bomb

pytestmark = pytest.mark.slow

BOMB_CHUNKS = 32  # x 64 MiB: 2 GiB inflated
PEAK_RSS_BOUND = 500 << 20
# The parent: runs the CLI, passes its output through, and says the child's peak RSS last.
_MEASURED = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(f'peak_rss_kib={peak}', file=sys.stderr)\n"
    "sys.exit(done.returncode)\n"
)


def _cli_peak(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``python -m edgebento *args`` and its peak resident memory in bytes (Linux: KiB)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, sys.executable, "-m", "edgebento", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    last = done.stderr.rstrip().rsplit("\n", 1)[-1]
    assert last.startswith("peak_rss_kib="), done.stderr
    return done, int(last.removeprefix("peak_rss_kib=")) * 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = gzip_bomb(BOMB_CHUNKS, b'{"device": "bomb"}\n')
    assert len(data) < 4 << 20 and BOMB_CHUNKS * (64 << 20) > 4 * MAX_PART_BYTES
    return data


def _put(s3: MotoS3, bucket: str, key: str, body: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=body)  # type: ignore[attr-defined]


def test_monitor_skips_a_gzip_bomb_as_unreadable_within_bounded_memory(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path, bomb: bytes
) -> None:
    key = "fleet/drift/date=2026-01-01/device=d1/part-b1-000000000001-000000000001.jsonl.gz"
    _put(s3_server, s3_bucket, key, bomb)
    _put(s3_server, s3_bucket, key.replace("part-b1", "part-b2"), b"not gzip at all")
    done, peak = _cli_peak(
        "monitor", "--store", f"s3://{s3_bucket}/fleet", "--endpoint-url",
        s3_server.endpoint_url, "--out", str(tmp_path / "drift"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert peak < PEAK_RSS_BOUND, f"monitor peaked at {peak >> 20} MiB"
    result = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert result["rejected_summaries"] == {"unreadable": 2}
    assert "inflates past the cap" in done.stderr


def test_fleet_status_skips_a_gzip_bomb_counts_it_and_shows_the_others(
    broker: Mosquitto, s3_server: MotoS3, s3_bucket: str, topic_prefix: str, bomb: bytes
) -> None:
    day = datetime.now(UTC).strftime("%Y-%m-%d")

    def key(device: str) -> str:
        return f"fleet/telemetry/date={day}/device={device}/part-b1-{1:012d}-{1:012d}.jsonl.gz"

    good = {"device": "good", "boot_id": "b1", "seq": 1, "ts": time.time(), "kind": "heartbeat"}
    _put(s3_server, s3_bucket, key("good"), gzip.compress(json.dumps(good).encode() + b"\n"))
    _put(s3_server, s3_bucket, key("bomb"), bomb)
    args = ("fleet", "status", "--broker", broker.url, "--prefix", topic_prefix, "--listen",
            "0.2", "--store", f"s3://{s3_bucket}/fleet", "--endpoint-url", s3_server.endpoint_url)  # fmt: skip
    done, peak = _cli_peak(*args, "--json")
    assert done.returncode == 0, done.stderr
    assert peak < PEAK_RSS_BOUND, f"fleet status peaked at {peak >> 20} MiB"
    doc = json.loads(done.stdout)
    assert set(doc["devices"]) == {"good"}
    assert doc["telemetry_objects_skipped"] == 1
    assert "inflates past the cap" in done.stderr
    table, peak = _cli_peak(*args)
    assert table.returncode == 0 and peak < PEAK_RSS_BOUND, table.stderr
    assert "1 telemetry object(s) in the store skipped as unreadable" in table.stdout
