"""The agent's SQLite files keep a small page cache: the start-up quick_check reads every page,
and SQLite's default (2 MB per connection) would hold a telemetry backlog's pages for good."""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.localdb import CACHE_KIB, connect


def test_a_backlog_read_at_start_stays_out_of_memory(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    db, _ = connect(path, "CREATE TABLE IF NOT EXISTS t (x BLOB);")
    db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(1000),) for _ in range(4000)])
    db.close()
    db, quarantined = connect(path, "CREATE TABLE IF NOT EXISTS t (x BLOB);")
    assert quarantined is None
    (cache,) = db.execute("PRAGMA cache_size").fetchone()
    assert cache == -CACHE_KIB  # negative: KiB, not pages
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    assert pages * page_size > 2 * CACHE_KIB * 1024  # the file is larger than the cache
    db.close()
