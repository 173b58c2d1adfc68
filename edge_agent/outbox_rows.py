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

import logging
import math
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import TelemetryRecord
from modelpack import untrusted_json

log = logging.getLogger(__name__)


class Holes:
    """The (boot_id, seq) of queued rows deleted here, and of records set aside over the
    broker's packet limit (``TelemetryPublisher._set_aside``). Batches sent before their
    deletion name a floor below them, and the ingestion acknowledges only up to the seq before a
    hole: the publisher sends again as soon as an acknowledgement stops there, under the floor
    that now covers it, rather than after the ack timeout (which acks of the current boot put
    off)."""

    def __init__(self) -> None:
        self._seqs: set[tuple[str, int]] = set()

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows as ``Outbox._check_left`` reads them: (id, typeof, body, boot_id blob, seq)."""
        for row in rows:
            if isinstance(row[4], int):
                self.mark(bytes(row[3] or b"").decode("utf-8", "replace"), row[4])

    def mark(self, boot_id: str, seq: int) -> None:
        """One seq taken out of the queue unsent (a record set aside over the packet limit)."""
        self._seqs.add((boot_id, seq))

    def stops_at(self, boot_id: str, seq: int) -> bool:
        """Whether an acknowledgement up to ``seq`` stops just before a hole; forgets the holes
        it reached."""
        hit = (boot_id, seq + 1) in self._seqs
        self._seqs = {(b, s) for b, s in self._seqs if b != boot_id or s > seq + 1}
        return hit


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
