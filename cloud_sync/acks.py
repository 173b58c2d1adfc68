"""What the ingestion has stored of each device's boot, and the acknowledgement that says so.

A device deletes a telemetry record only once it is acknowledged, so an acknowledgement must
never run ahead of the store: ``seq`` is the highest seq such that every seq from 0 up to it is
stored, or below the ``floor`` the device names in its batches (seqs it acknowledged or evicted
itself, which will never come). Seqs are learnt from what this process wrote, what it found
already stored (duplicates), and what it listed in the store (another sync process's writes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from cloud_sync.parts import RangeSet, Run, Stream, parse_range
from cloud_sync.store import ObjectStore

Boot = tuple[str, str]  # (device, boot_id)


class AckTracker:
    def __init__(self) -> None:
        self._stored: dict[Boot, RangeSet] = {}
        self._lock = threading.Lock()

    def stored(self, boot: Boot, first: int, last: int) -> None:
        with self._lock:
            self._stored.setdefault(boot, RangeSet()).add(first, last)

    def floor(self, boot: Boot, floor: int) -> None:
        if floor > 0:
            self.stored(boot, 0, floor - 1)

    def ack(self, boot: Boot) -> int:
        """The highest seq of ``boot`` that may be acknowledged (-1: none yet)."""
        with self._lock:
            ranges = self._stored.get(boot)
            if ranges is None or not ranges.spans or ranges.spans[0][0] != 0:
                return -1
            return ranges.spans[0][1]


class StoredRanges:
    """Which seqs of each stream are in the store, learnt by listing once and by writing.

    Everything it learns also goes to ``tracker``, per (device, boot) across days and roots.
    """

    def __init__(self, store: ObjectStore, tracker: AckTracker) -> None:
        self.store, self.tracker = store, tracker
        self._known: dict[Stream, RangeSet] = {}
        self._lock = threading.Lock()

    def refresh_if_needed(self, runs: Iterable[Run]) -> None:
        for run in runs:
            with self._lock:
                known = self._known.get(run.stream)
            # Contiguous with what we wrote last: nobody else can have written it. Otherwise
            # (first sight, a replay, or a gap another process may have filled) ask the store.
            if known is None or run.first != known.high + 1:
                self._refresh(run.stream)

    def _refresh(self, stream: Stream) -> None:
        ranges = RangeSet()
        for key in self.store.list(stream.prefix):
            span = parse_range(key)
            if span is not None:
                ranges.add(*span)
                self.tracker.stored((stream.device, stream.boot_id), *span)
        with self._lock:
            self._known[stream] = ranges

    def new_records(self, runs: Iterable[Run]) -> tuple[list[dict[str, Any]], int]:
        fresh, dropped = [], 0
        with self._lock:
            for run in runs:
                known = self._known.get(run.stream, RangeSet())
                for record in run.records:
                    if int(record["seq"]) in known:
                        dropped += 1
                    else:
                        fresh.append(record)
        return fresh, dropped

    def written(self, run: Run) -> None:
        with self._lock:
            self._known.setdefault(run.stream, RangeSet()).add(run.first, run.last)
        self.tracker.stored((run.stream.device, run.stream.boot_id), run.first, run.last)
