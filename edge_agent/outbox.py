"""The telemetry outbox: a SQLite (WAL) queue bounded in bytes that survives kill -9 and full disks.

Each record gets ``device``, ``boot_id`` and a ``seq`` that rises by one per boot, assigned in
the same transaction that stores it, so a record that could not be stored never takes a seq and
the cloud sees no gap it would wait for. Records leave only when the ingestion acknowledged that
they are stored (``ack_upto``: a ``TelemetryAck`` names a boot and the highest contiguous seq).

Rows a previous run left are checked once before they are sent (``edge_agent.outbox_rows``): a
row that is not a record the ingestion takes would make its whole batch invalid.

A file SQLite cannot read is quarantined (``edge_agent.localdb``) and a new one started, at
start or at run time, so a damaged outbox never keeps the device down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate, compress
from pathlib import Path
from typing import Any, Literal

from edge_agent.outbox_file import OutboxFile, disk_full
from edge_agent.outbox_rows import Holes, deliverable, restorable

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "drop_newest"]
ASIDE_KEPT = 64  # records kept aside at most (over a limit the broker states, or one it took five drops to learn)


@dataclass(frozen=True)
class Pending:
    id: int
    body: bytes
    boot_id: str = ""
    seq: int = 0


class Outbox(OutboxFile):
    """Append records, read them oldest first, delete them once acknowledged."""

    def __init__(
        self,
        path: Path,
        device: str,
        max_bytes: int,
        overflow: Overflow = "drop_oldest",
        boot_id: str | None = None,
    ) -> None:
        self.device, self.max_bytes, self.overflow = device, max_bytes, overflow
        self.boot_id = boot_id or uuid.uuid4().hex
        self.next_seq = 0
        super().__init__(path)

    def _open(self) -> None:
        super()._open()
        # Rows a previous run left, checked once before they are first sent (outbox_rows):
        # every id this process appends is above them (AUTOINCREMENT), and trusted as written.
        self._checked_upto = 0
        self._left_upto = 0
        self.holes = Holes()
        with contextlib.suppress(sqlite3.DatabaseError):
            (self._left_upto,) = self._db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM records"
            ).fetchone()

    def counters(self) -> dict[str, int]:
        rows = super().counters()
        rows.setdefault("dropped_aside", 0)  # set aside, then evicted past ``ASIDE_KEPT``
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
        return self._append(kind, data, time.time() if ts is None else ts)

    def _append(
        self, kind: str, data: dict[str, Any], ts: float, aside_id: int | None = None
    ) -> int | None:
        """``append``; with ``aside_id``, that row of ``aside`` goes in the same transaction
        (a crash between the two would store the record twice, under two seqs)."""
        with self._lock:
            seq = self.next_seq
            body = self._encode(kind, data, seq, ts)
            if len(body) > self.max_bytes:
                self._drop_newest(aside_id)
                return None
            for attempt in (1, 2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    if self.bytes + len(body) > self.max_bytes:
                        if self.overflow == "drop_newest":
                            self._drop_newest(aside_id)
                            self._db.execute("COMMIT")
                            return None
                        self._evict_oldest(len(body))
                    self._db.execute(
                        "INSERT INTO records(boot_id, seq, size, body) VALUES(?, ?, ?, ?)",
                        (self.boot_id, seq, len(body), body),
                    )
                    if aside_id is not None:
                        self._db.execute("DELETE FROM aside WHERE id = ?", (aside_id,))
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError as exc:
                    self._rollback()
                    if attempt == 1 and self._recover(exc):
                        if aside_id is not None:
                            return None  # a new file: the aside row is in the quarantined one
                        continue
                    self._reload_size()
                    if disk_full(exc) and attempt == 1 and self.count:
                        # Make room inside the file we already own, then try once more.
                        self._shrink_for_disk()
                        continue
                    if aside_id is not None:
                        log.warning("a set-aside telemetry record stays aside: %s", exc)
                        return None  # not lost: still in ``aside``
                    self.dropped_disk_full += 1
                    log.warning("telemetry record dropped: %s", exc)
                    return None
                self.next_seq += 1
                self.bytes += len(body)
                self.count += 1
                return seq
        return None

    def _drop_newest(self, aside_id: int | None) -> None:
        self._bump("dropped_overflow")
        if aside_id is not None:
            self._db.execute("DELETE FROM aside WHERE id = ?", (aside_id,))

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
        """Up to ``limit`` records after ``after_id``, oldest first, all of one boot."""
        while True:
            if self._checked_upto < self._left_upto and not self._check_left(limit):
                return []
            with self._lock:
                try:
                    rows = self._db.execute(
                        "SELECT id, body, boot_id, seq FROM records WHERE id > ? ORDER BY id "
                        "LIMIT ?",
                        (after_id, limit),
                    ).fetchall()
                except sqlite3.DatabaseError as exc:
                    if self._recover(exc) or self._checked_upto >= self._left_upto:
                        return []
                    continue  # a row not yet checked that sqlite3 cannot read (text not UTF-8)
            if self._checked_upto < self._left_upto:  # never up to a row not yet checked
                checked = [r[0] <= self._checked_upto or r[0] > self._left_upto for r in rows]
                if checked and not checked[0]:
                    continue
                rows = list(compress(rows, accumulate(checked, min)))
            batch = [Pending(int(r[0]), bytes(r[1]), str(r[2]), int(r[3])) for r in rows]
            return [p for p in batch if p.boot_id == batch[0].boot_id] if batch else []

    def _check_left(self, limit: int) -> bool:
        """Check the next ``limit`` rows a previous run left; delete and count those that are
        not records the ingestion takes (one would make its whole batch invalid). False when it
        could not: they are checked at the next read."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, typeof(body), CAST(body AS BLOB), CAST(boot_id AS BLOB), seq "
                    "FROM records WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (self._checked_upto, self._left_upto, limit),
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                return False
        bad = [r for r in rows if deliverable(r[1:], self.device) is None]
        ids = tuple(r[0] for r in bad)
        if bad and not self._delete(f"id IN ({','.join('?' * len(ids))})", ids, "dropped_corrupt"):
            return False
        self.holes.add(bad)
        self._checked_upto = rows[-1][0] if len(rows) == limit else self._left_upto
        return True

    def floor(self, boot_id: str) -> int | None:
        """The lowest seq of ``boot_id`` still held: every seq below is acknowledged or evicted."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT MIN(seq) FROM records WHERE boot_id = ?", (boot_id,)
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                return None
        return None if row[0] is None else int(row[0])

    def count_upto(self, record_id: int) -> int:
        """How many records are held at or before ``record_id`` (sent and not yet acknowledged)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM records WHERE id <= ?", (record_id,)
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                return 0
        return int(row[0])

    def ack_upto(self, boot_id: str, seq: int) -> int:
        """Delete every record of ``boot_id`` up to ``seq`` (the ingestion stored them)."""
        return self._delete("boot_id = ? AND seq <= ?", (boot_id, seq))

    def ack(self, ids: list[int]) -> None:
        """Delete records by id."""
        if ids:
            self._delete(f"id IN ({','.join('?' * len(ids))})", tuple(ids))

    def _delete(self, where: str, params: tuple[Any, ...], counted: str | None = None) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records WHERE {where}", params
                ).fetchone()
                self._db.execute(f"DELETE FROM records WHERE {where}", params)
                if counted is not None:
                    self._bump(counted, int(row[1]))
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                if not self._recover(exc):
                    log.warning("cannot delete acknowledged records (they are sent again): %s", exc)
                return 0
            self.bytes -= int(row[0])
            self.count -= int(row[1])
            return int(row[1])

    # --- set aside: over a packet bound the broker said or one learned from its drops --------

    def set_aside(self, record_id: int) -> None:
        """Out of the queue (the ingestion moves past its seq), kept on disk: the limit may be
        false or lapse; ``restore_aside`` queues it again. Only ``ASIDE_KEPT``: past them the
        agent's own ``telemetry_set_aside`` events go first, then the oldest records; each
        counted (``dropped_aside``) and logged with its seq."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                (size,) = self._db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM records WHERE id = ?", (record_id,)
                ).fetchone()
                self._db.execute(
                    "INSERT INTO aside(body) SELECT body FROM records WHERE id = ?", (record_id,)
                )
                evicted = self._evict_aside()
                gone = self._db.execute("DELETE FROM records WHERE id = ?", (record_id,)).rowcount
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                if not self._recover(exc):
                    log.warning("cannot set a telemetry record aside (it is sent again): %s", exc)
                return
            self.bytes -= int(size)
            self.count -= gone
        for body in evicted:
            log.warning(
                "telemetry record %s set aside earlier dropped: more than %d kept aside",
                _seq(body),
                ASIDE_KEPT,
            )

    def _evict_aside(self) -> list[bytes]:
        """Past ``ASIDE_KEPT`` rows: the set-aside events first, then the oldest; their bodies."""
        (held,) = self._db.execute("SELECT COUNT(*) FROM aside").fetchone()
        if held <= ASIDE_KEPT:
            return []
        rows = self._db.execute(
            "SELECT id, body FROM aside ORDER BY instr(body, ?) = 0, id LIMIT ?",
            (_SET_ASIDE_EVENT, held - ASIDE_KEPT),
        ).fetchall()
        ids = tuple(r[0] for r in rows)
        self._db.execute(f"DELETE FROM aside WHERE id IN ({','.join('?' * len(ids))})", ids)
        self._bump("dropped_aside", len(ids))
        return [bytes(r[1]) for r in rows]

    def restore_aside(self) -> int:
        """Queue again, as new records of this boot, those set aside: at start, or once the
        bound they were over lapsed. How many. Each record and its aside row change in one
        transaction."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT id, body FROM aside ORDER BY id").fetchall()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                return 0
        restored = 0
        for row_id, body in rows:
            record = restorable(body)
            if record is not None:
                restored += self._append(*record, aside_id=row_id) is not None
                continue
            with self._lock:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("DELETE FROM aside WHERE id = ?", (row_id,))
                    self._bump("dropped_corrupt")
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError:
                    self._rollback()
        return restored


# How the agent's own telemetry_set_aside events start, as ``_encode`` writes them: evicted
# from ``aside`` before any other record.
_SET_ASIDE_EVENT = b'"kind":"event","data":{"event":"telemetry_set_aside",'


def _seq(body: bytes) -> object:
    """The seq a set-aside row names, for the log ("?" when it is not a record)."""
    try:
        record = json.loads(body)
    except ValueError:
        return "?"
    return record.get("seq", "?") if isinstance(record, dict) else "?"


def batch_payload(
    records: list[Pending], floor: int | None = None, skip: list[int] | None = None
) -> bytes:
    """A TelemetryBatch from stored record bodies, without parsing them again; ``skip`` (with
    a floor) only when there is one: a sync from before it refuses the field."""
    tail = b"]}" if floor is None else b'],"floor":%d}' % floor
    if floor is not None and skip:
        tail = b'],"floor":%d,"skip":[%s]}' % (floor, ",".join(map(str, skip)).encode())
    return b'{"schema_version":1,"records":[' + b",".join(r.body for r in records) + tail
