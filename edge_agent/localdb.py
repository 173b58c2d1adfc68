"""The agent's SQLite files (telemetry outbox, command replies): opened so a corrupt file never
keeps the device from starting.

A file SQLite cannot read (``file is not a database``, ``database disk image is malformed``) is
renamed aside with its WAL and shared-memory files, so someone can look at it, and a new empty
one is created in its place. The caller reports the quarantine as an event and counts it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

_SIDE_FILES = ("-wal", "-shm", "-journal")
# SQLite's default page cache is 2 MB per connection, and quick_check below reads every page:
# with a 20 MB telemetry backlog that is 2 MB more anonymous memory per file, held for good.
# The agent's queries go through indexes; 128 KiB measured 0.1 MB on the same backlog.
CACHE_KIB = 128


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """A damaged file, as opposed to a full disk or a lock (sqlite3.OperationalError)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "malformed" in str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError)


def quarantine(path: Path) -> Path:
    """Rename ``path`` (and its side files) aside; the new name, for the report."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time() * 1000)}")
    for suffix in ("", *_SIDE_FILES):
        src = Path(f"{path}{suffix}")
        if src.exists():
            with contextlib.suppress(OSError):
                src.rename(Path(f"{aside}{suffix}"))
    log.error("%s is corrupt; kept as %s and started afresh", path.name, aside.name)
    return aside


def connect(
    path: Path, schema: str, synchronous: str = "NORMAL"
) -> tuple[sqlite3.Connection, Path | None]:
    """An open connection with ``schema`` applied; the quarantined file if the old one was bad."""
    path.parent.mkdir(parents=True, exist_ok=True)
    quarantined = None
    for attempt in (1, 2):
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.executescript(schema)
            # quick_check reads every page: a file damaged in the middle is caught now, at
            # start, instead of failing some later query.
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {verdict}")
            return db, quarantined
        except sqlite3.DatabaseError as exc:
            db.close()
            if attempt == 2 or not is_corruption(exc):
                raise
            quarantined = quarantine(path)
    raise AssertionError("unreachable")
