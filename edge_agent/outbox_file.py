"""The outbox's SQLite file: opened in WAL with full syncs, quarantined and started again when
SQLite cannot read it, its counters, and the bytes and records it holds.

``edge_agent.outbox.Outbox`` is the queue on top (append, read, acknowledge, set aside); this is
what any write or read of it falls back on when the file is damaged (``_recover``) or the disk
is full (``disk_full``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

from edge_agent.localdb import connect, is_corruption

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_boot_seq ON records(boot_id, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS aside (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);
"""


class OutboxFile:
    """The file under the outbox; every use of ``_db`` holds ``_lock``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Counted in memory too: a full disk cannot record its own drops.
        self.dropped_disk_full = 0
        self.quarantined: list[Path] = []
        self.bytes = self.count = 0
        self._open()

    def _open(self) -> None:
        # FULL: a record the cloud has not stored must survive a power cut, not just kill -9.
        self._db, aside = connect(self.path, _SCHEMA, synchronous="FULL")
        if aside is not None:
            self._quarantined(aside)
        self._reload_size()

    def _quarantined(self, aside: Path) -> None:
        self.quarantined.append(aside)  # the agent reports each one as an event

    def _recover(self, exc: sqlite3.DatabaseError) -> bool:
        """After an error at run time: quarantine and reopen a damaged file; True if it was."""
        if not is_corruption(exc):
            return False
        from edge_agent.localdb import quarantine

        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        aside = quarantine(self.path)
        self._open()
        self._quarantined(aside)
        return True

    # --- counters ------------------------------------------------------------------------------

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        with self._lock:
            try:
                rows = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                rows = {}
        rows.setdefault("evicted", 0)
        rows.setdefault("dropped_overflow", 0)
        rows.setdefault("dropped_corrupt", 0)
        rows["dropped_disk_full"] = self.dropped_disk_full
        rows["quarantined"] = len(self.quarantined)
        return rows

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def _reload_size(self) -> None:
        try:
            row = self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records"
            ).fetchone()
            self.bytes, self.count = int(row[0]), int(row[1])
        except sqlite3.DatabaseError:
            pass

    def close(self) -> None:
        with self._lock:
            self._db.close()


def disk_full(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "full" in text or getattr(exc, "sqlite_errorcode", 0) == 13
