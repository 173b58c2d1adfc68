"""The telemetry outbox: a SQLite (WAL) queue bounded in bytes that survives kill -9 and full disks.

Each record gets ``device``, ``boot_id`` and a ``seq`` that rises by one per boot, assigned in
the same transaction that stores it, so a record that could not be stored never takes a seq and
the cloud sees no gap it would wait for. Records leave only when the broker acknowledged them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "drop_newest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Pending:
    id: int
    body: bytes


class Outbox:
    """Append records, read them oldest first, delete them once acknowledged."""

    def __init__(
        self,
        path: Path,
        device: str,
        max_bytes: int,
        overflow: Overflow = "drop_oldest",
        boot_id: str | None = None,
    ) -> None:
        self.path, self.device, self.max_bytes, self.overflow = path, device, max_bytes, overflow
        self.boot_id = boot_id or uuid.uuid4().hex
        self.next_seq = 0
        self._lock = threading.Lock()
        # Counted in memory too: a full disk cannot record its own drops.
        self.dropped_disk_full = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a record the broker will not see must survive a power cut, not just kill -9.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records").fetchone()
        self.bytes, self.count = int(row[0]), int(row[1])

    # --- counters ------------------------------------------------------------------------------

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        with self._lock:
            rows = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        rows.setdefault("evicted", 0)
        rows.setdefault("dropped_overflow", 0)
        rows["dropped_disk_full"] = self.dropped_disk_full
        return rows

    def stats(self) -> dict[str, Any]:
        return {
            "records": self.count,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "overflow": self.overflow,
            **self.counters(),
        }

    # --- writing -------------------------------------------------------------------------------

    def _evict_oldest(self, need: int) -> int:
        """Delete oldest records until ``need`` more bytes fit; return how many went."""
        freed = gone = 0
        rows = self._db.execute("SELECT id, size FROM records ORDER BY id").fetchall()
        cut = None
        for rid, size in rows:
            if self.bytes - freed + need <= self.max_bytes:
                break
            freed += size
            gone += 1
            cut = rid
        if cut is not None:
            self._db.execute("DELETE FROM records WHERE id <= ?", (cut,))
            self._bump("evicted", gone)
            self.bytes -= freed
            self.count -= gone
        return gone

    def _encode(self, kind: str, data: dict[str, Any], seq: int, ts: float) -> bytes:
        record = {
            "schema_version": 1,
            "device": self.device,
            "boot_id": self.boot_id,
            "seq": seq,
            "ts": ts,
            "kind": kind,
            "data": data,
        }
        return json.dumps(record, separators=(",", ":"), default=str).encode()

    def append(self, kind: str, data: dict[str, Any], ts: float | None = None) -> int | None:
        """Store one record; its seq, or None when the overflow policy or the disk dropped it."""
        with self._lock:
            seq = self.next_seq
            body = self._encode(kind, data, seq, time.time() if ts is None else ts)
            if len(body) > self.max_bytes:
                self._bump("dropped_overflow")
                return None
            for attempt in (1, 2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    if self.bytes + len(body) > self.max_bytes:
                        if self.overflow == "drop_newest":
                            self._bump("dropped_overflow")
                            self._db.execute("COMMIT")
                            return None
                        self._evict_oldest(len(body))
                    self._db.execute(
                        "INSERT INTO records(boot_id, seq, size, body) VALUES(?, ?, ?, ?)",
                        (self.boot_id, seq, len(body), body),
                    )
                    self._db.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    self._rollback()
                    self._reload_size()
                    if _disk_full(exc) and attempt == 1 and self.count:
                        # Make room inside the file we already own, then try once more.
                        self._shrink_for_disk()
                        continue
                    self.dropped_disk_full += 1
                    log.warning("telemetry record dropped: %s", exc)
                    return None
                self.next_seq += 1
                self.bytes += len(body)
                self.count += 1
                return seq
        return None

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("ROLLBACK")

    def _reload_size(self) -> None:
        try:
            row = self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records"
            ).fetchone()
            self.bytes, self.count = int(row[0]), int(row[1])
        except sqlite3.OperationalError:
            pass

    def _shrink_for_disk(self) -> None:
        """On a full disk, evict the oldest quarter: deletes reuse pages without growing the file."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._evict_oldest(max(1, self.bytes // 4) + (self.max_bytes - self.bytes))
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            self._reload_size()
            log.warning("cannot evict on a full disk: %s", exc)

    # --- reading and acknowledging --------------------------------------------------------------

    def peek(self, after_id: int, limit: int) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body FROM records WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [Pending(int(r[0]), bytes(r[1])) for r in rows]

    def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                marks = ",".join("?" * len(ids))
                row = self._db.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records WHERE id IN ({marks})",
                    ids,
                ).fetchone()
                self._db.execute(f"DELETE FROM records WHERE id IN ({marks})", ids)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                log.warning("cannot delete acknowledged records (they will be sent again): %s", exc)
                return
            self.bytes -= int(row[0])
            self.count -= int(row[1])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "full" in text or getattr(exc, "sqlite_errorcode", 0) == 13


def batch_payload(records: list[Pending]) -> bytes:
    """A TelemetryBatch from stored record bodies, without parsing them again."""
    return b'{"schema_version":1,"records":[' + b",".join(r.body for r in records) + b"]}"
