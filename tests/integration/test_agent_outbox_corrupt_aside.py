"""Rows set aside in the agent's outbox (records over a learned packet limit, queued again at
start) that are not the records the agent wrote: ``telemetry.db`` is local state that anything
with access to the device's disk may alter. On the previous code the first such row raised out
of ``restore_aside`` (json.loads: JSONDecodeError, ValueError for 5,000 digits, RecursionError,
AttributeError for a list): the rows after it were never queued again, and stayed in the file.
Here each is deleted and counted (``dropped_corrupt``), and the good ones are delivered.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import Outbox
from tests.support.agent import Client, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow

CORRUPT: list[object] = [
    b"{not json",
    b"[1, 2]",
    b'{"kind": "event", "ts": 1, "data": {"n": ' + b"1" * 5000 + b"}}",
    b'{"kind": "event", "ts": 1, "data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"kind": "event", "ts": "yesterday", "data": {}}',
    b"\xff\xfe\x00 not text",
    7,  # SQLite keeps what it is given: an integer in the BLOB column
]


def _good(n: int) -> bytes:
    return json.dumps(
        {"kind": "event", "ts": time.time(), "data": {"event": "kept", "n": n}}
    ).encode()


def _seed(db: Path) -> None:
    Outbox(db, "dev-a", 16 << 20).close()  # the file with the agent's own schema
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        rows = [_good(0), *CORRUPT, _good(1)]
        conn.executemany("INSERT INTO aside(body) VALUES (?)", [(r,) for r in rows])


def _left(db: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        aside = conn.execute("SELECT COUNT(*) FROM aside").fetchone()[0]
        row = conn.execute("SELECT value FROM counters WHERE name = 'dropped_corrupt'").fetchone()
    return int(aside), int(row[0]) if row else 0


def test_corrupt_set_aside_rows_are_dropped_and_counted_and_the_good_ones_delivered(
    agent_factory: Any, client: Client, broker: Mosquitto, pack_v1: Path, topic_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    data = tmp_path / "agent"
    data.mkdir()
    _seed(data / "telemetry.db")
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    try:
        agent = agent_factory(pack=pack_v1)
        _check(agent, watch, client, topic_prefix, data / "telemetry.db")
    finally:
        watch.close()


def _check(agent: Any, watch: DeviceWatch, client: Client, prefix: str, db: Path) -> None:
    wait_online(client, prefix, "dev-a")

    def kept(records: list[dict[str, Any]]) -> list[int]:
        return sorted(r["data"]["n"] for r in records if r["data"].get("event") == "kept")

    assert watch.wait(lambda rs: kept(rs) == [0, 1]) and kept(watch.records) == [0, 1]
    assert client.request(f"{prefix}/dev-a/cmd/ping", {})["pong"] is True
    assert agent.stop() == 0
    assert _left(db) == (0, len(CORRUPT))
    assert agent.output().count("telemetry record set aside dropped") == len(CORRUPT)
    assert "Traceback" not in agent.output()
