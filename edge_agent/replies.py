"""A device's replies by command id, so that a command runs at most once per ``id``: a reply is
kept (in SQLite, so a redelivery after a restart is answered too) and sent again when the same
``id`` comes back."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.localdb import connect, is_corruption, quarantine
from modelpack import untrusted_json

KEEP_REPLIES = 2000
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, ts REAL, body TEXT);"


class ReplyCache:
    """Replies by command id; ``claim`` says whether this delivery is the first one.

    A corrupt file is quarantined (``edge_agent.localdb``) without losing the cache: the rows
    still readable in the damaged file are copied into the new one, and the replies this process
    stored are kept in memory too and written back, so a command redelivered after a quarantine
    is still answered from the cache instead of running a second time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.quarantined: list[Path] = []
        self._memory: dict[str, tuple[float, str]] = {}  # the newest KEEP_REPLIES replies
        self._db, aside = connect(path, _SCHEMA)
        if aside is not None:
            self.quarantined.append(aside)
            self._restore(salvage(aside))
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """A file damaged at run time: aside, a new one, and the cache put back into it."""
        if is_corruption(exc):
            self._db.close()
            aside = quarantine(self.path)
            self.quarantined.append(aside)
            self._db, _ = connect(self.path, _SCHEMA)
            self._restore({**salvage(aside), **self._memory})

    def _restore(self, rows: dict[str, tuple[float, str]]) -> None:
        newest = sorted(rows.items(), key=lambda item: item[1][0])[-KEEP_REPLIES:]
        with contextlib.suppress(sqlite3.DatabaseError):  # a full disk: memory still answers
            self._db.executemany(
                "INSERT OR REPLACE INTO replies(id, ts, body) VALUES(?, ?, ?)",
                [(rid, ts, body) for rid, (ts, body) in newest],
            )
        self._memory.update(newest)

    def claim(self, request_id: str) -> tuple[bool, dict[str, Any] | None]:
        """(first delivery?, the stored reply of an earlier delivery if it finished)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT body FROM replies WHERE id = ?", (request_id,)
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                row = None
            if row is None and request_id in self._memory:
                row = (self._memory[request_id][1],)
            if row is not None:
                return False, json.loads(row[0])
            if request_id in self._running:
                return False, None
            self._running.add(request_id)
            return True, None

    def store(self, request_id: str, reply: dict[str, Any]) -> None:
        body = json.dumps(reply, default=str)
        with self._lock:
            self._running.discard(request_id)
            self._memory[request_id] = (time.time(), body)
            if len(self._memory) > KEEP_REPLIES:
                del self._memory[next(iter(self._memory))]
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies(id, ts, body) VALUES(?, ?, ?)",
                    (request_id, time.time(), body),
                )
                self._db.execute(
                    "DELETE FROM replies WHERE id NOT IN "
                    "(SELECT id FROM replies ORDER BY ts DESC LIMIT ?)",
                    (KEEP_REPLIES,),
                )
            except sqlite3.DatabaseError as exc:
                self._recover(exc)  # a full disk: the reply was still sent; only replay is lost

    def close(self) -> None:
        with self._lock:
            self._db.close()


def salvage(aside: Path) -> dict[str, tuple[float, str]]:
    """The replies still readable in a quarantined file, row by row (a damaged page costs the
    rows on it, not the cache)."""
    rows: dict[str, tuple[float, str]] = {}
    try:
        db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows
    try:
        try:
            (top,) = db.execute("SELECT max(rowid) FROM replies").fetchone()
        except sqlite3.Error:
            return rows
        top = int(top or 0)
        for rowid in range(top, max(0, top - 10 * KEEP_REPLIES), -1):  # newest rows first
            if len(rows) >= KEEP_REPLIES:
                break
            with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                got = db.execute(
                    "SELECT id, ts, body FROM replies WHERE rowid = ?", (rowid,)
                ).fetchone()
                if got is not None:
                    untrusted_json.loads(got[2])  # only a reply that still parses is kept
                    rows[str(got[0])] = (float(got[1]), str(got[2]))
    finally:
        db.close()
    return rows
