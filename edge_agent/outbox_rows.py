"""Outbox rows a previous run left, checked before they are sent or queued again.

The outbox file is local state: anything with access to the device's disk (or a disk fault) may
have altered it. A record this process appended is trusted as written, but a row found in the
file is checked once, the first time it is read: in the queue (``records``), one body that is
not a record sent unparsed inside a batch made the whole batch invalid JSON, the ingestion
refused it without an acknowledgement, and the device sent that batch again after every ack
timeout, delivering nothing after it for the rest of the boot. A row that fails is deleted,
logged and counted (``dropped_corrupt``).
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import MAX_SKIP, TelemetryRecord
from modelpack import untrusted_json

log = logging.getLogger(__name__)


class Holes:
    """The seqs, per boot, of queued rows deleted here and of records set aside over the
    broker's packet limit (``TelemetryPublisher._set_aside``). Each batch names those between
    its floor and its last record (``between``: ``TelemetryBatch.skip``, at most ``MAX_SKIP``),
    so the ingestion acknowledges past them in one round trip. A hole no batch sent could name
    (more than ``MAX_SKIP`` of them, or batches sent before it) is the fallback's: when an
    acknowledgement stops just before it the publisher sends again at once, under the floor
    that now covers it, rather than after the ack timeout (which acks of the current boot put
    off). Kept sorted: an acknowledgement costs a bisection, not a pass over every hole."""

    def __init__(self) -> None:
        self._seqs: dict[str, list[int]] = {}  # boot_id -> its holes, ascending
        self._named: dict[str, int] = {}  # boot_id -> the highest hole a sent batch named

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows as ``Outbox._check_left`` reads them: (id, typeof, body, boot_id blob, seq)."""
        for row in rows:
            if isinstance(row[4], int):
                self.mark(bytes(row[3] or b"").decode("utf-8", "replace"), row[4])

    def mark(self, boot_id: str, seq: int) -> None:
        """One seq taken out of the queue unsent (a record set aside over the packet limit)."""
        holes = self._seqs.setdefault(boot_id, [])
        at = bisect.bisect_left(holes, seq)
        if at == len(holes) or holes[at] != seq:
            holes.insert(at, seq)

    def between(self, boot_id: str, low: int, high: int) -> list[int]:
        """The holes of ``boot_id`` from ``low`` to ``high``, at most ``MAX_SKIP``."""
        holes = self._seqs.get(boot_id, [])
        lo = bisect.bisect_left(holes, low)
        return holes[lo : min(bisect.bisect_right(holes, high), lo + MAX_SKIP)]

    def named(self, boot_id: str, skip: list[int] | None) -> None:
        """A batch that names ``skip`` was sent: an ack stopping before one is no reason to
        send again (the batch's own ack goes past it)."""
        if skip:
            self._named[boot_id] = max(self._named.get(boot_id, -1), skip[-1])

    def stops_at(self, boot_id: str, seq: int) -> bool:
        """Whether an acknowledgement up to ``seq`` stops just before a hole no batch named;
        forgets the holes it reached."""
        holes = self._seqs.get(boot_id)
        if not holes:
            return False
        at = bisect.bisect_left(holes, seq + 1)
        hit = at < len(holes) and holes[at] == seq + 1
        del holes[: at + 1 if hit else at]
        if not holes:
            self.forget(boot_id)
        return hit and seq + 1 > self._named.get(boot_id, -1)

    def forget(self, boot_id: str) -> None:
        """The boot has nothing left to send (its holes past its last row can never be met)."""
        self._seqs.pop(boot_id, None)
        self._named.pop(boot_id, None)


def _record(body: object, what: str) -> dict[str, Any] | str:
    """The record a stored body holds, or why it is not one the agent wrote."""
    try:
        if not isinstance(body, bytes | str):  # a column SQLite holds as another type
            raise untrusted_json.NotJsonError(f"its body is {type(body).__name__}, not text")
        record = untrusted_json.loads(body, what)
    except untrusted_json.NotJsonError as exc:
        return str(exc)
    if not isinstance(record, dict):
        return "not a JSON object"
    kind, data, ts = record.get("kind"), record.get("data") or {}, record.get("ts")
    if (
        not isinstance(kind, str)
        or not isinstance(data, dict)
        or not isinstance(ts, int | float)
        or isinstance(ts, bool)
        or not math.isfinite(ts)
    ):
        return "not a telemetry record"
    return record


def restorable(body: object) -> tuple[str, dict[str, Any], float] | None:
    """What ``Outbox.append`` needs to queue a set-aside record again, or None (logged) when
    its row is not a record the agent wrote."""
    record = _record(body, "a set-aside telemetry record")
    if isinstance(record, str):
        log.warning("telemetry record set aside dropped: %s", record)
        return None
    return str(record["kind"]), record.get("data") or {}, float(record["ts"])


def deliverable(row: tuple[Any, ...], device: str) -> bytes | None:
    """The body of a queued row to send as it is, or None (logged) when the ingestion would
    refuse it. ``row`` is (typeof(body), body, boot_id, seq) with body and boot_id read as
    blobs (text that is not UTF-8 raises in sqlite3 before anything could check it)."""
    stored_as, body, boot_id, seq = row
    why = _refusal(stored_as, body, boot_id, seq, device)
    if why is not None:
        log.warning("telemetry record %r in the outbox dropped: %s", seq, why)
        return None
    assert isinstance(body, bytes)
    return body


def _refusal(
    stored_as: object, body: object, boot_id: object, seq: object, device: str
) -> str | None:
    if stored_as != "blob":  # the agent writes bytes; sqlite3 hands text back as str
        return f"its body is stored as {stored_as}, not as the blob the agent writes"
    record = _record(body, "a queued telemetry record")
    if isinstance(record, str):
        return record
    try:
        boot = boot_id.decode() if isinstance(boot_id, bytes) else None
    except UnicodeDecodeError:
        boot = None
    if (record.get("device"), record.get("boot_id"), record.get("seq")) != (device, boot, seq):
        return "not the record its row names (device, boot_id and seq differ)"
    if not isinstance(seq, int) or isinstance(record["seq"], bool):
        return "its seq is not an integer"
    try:
        TelemetryRecord.model_validate(record)
    except ValidationError as exc:
        return f"not a record the ingestion takes: {exc.errors()[0]['msg']}"
    return None
