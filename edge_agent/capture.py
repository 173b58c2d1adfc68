"""Sampled capture of inference inputs and outputs, shipped to the object store.

Capped twice: a sampling ``rate`` (share of requests kept) and ``max_bytes`` per capture file.
A full buffer is shipped and a new one begun; with no store configured files stay under
``{data_dir}`` for someone to collect. Captures are gzipped JSON lines, never pickles.

Files go to the same partitioned layout as the capture records cloud_sync ingests
(``capture/date=YYYY-MM-DD/device=ID/part-...jsonl.gz``, built by ``cloud_sync.parts``), under a
stream of their own, ``{boot_id}.samples``, numbered by sample: were they under the boot's own
stream, ingest would read their sample ranges as telemetry seqs already stored and drop records.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpack.codec import dumps
from modelpack.errors import EdgebentoError

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class _Batch:
    lines: tuple[bytes, ...]
    first: int  # the sample number (1, 2, ... per boot) of the first line
    first_ts: float


class Capture:
    def __init__(
        self,
        device: str,
        boot_id: str,
        local_dir: Path,
        store_url: str | None,
        rate: float,
        max_bytes: int,
        report: Report,
    ) -> None:
        self.device, self.boot_id = device, boot_id
        self.local_dir, self.store_url = local_dir, store_url
        self.rate, self.max_bytes = rate, max_bytes
        self.report = report
        self.active = rate > 0
        self._lines: list[bytes] = []
        self._size = 0
        self._first_ts = 0.0  # when the buffer's first sample was taken: its date partition
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.samples = 0
        self.shipped: list[str] = []
        self._store: Any = None

    def observe(self, request: Any, answer: dict[str, Any]) -> None:
        """Called after every successful inference; keeps a sampled share of them."""
        if not self.active or self._rng.random() >= self.rate:
            return
        now = time.time()
        try:  # the codec's encoder: an answer may hold its numbers written already
            line = dumps({"ts": now, "request": request, "answer": answer})
        except (TypeError, ValueError):  # a request JSON cannot spell (NaN) is not kept
            return
        if len(line) > self.max_bytes:
            return
        full: _Batch | None = None
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                full = self._take()
            if not self._lines:
                self._first_ts = now
            self._lines.append(line + b"\n")
            self._size += len(line) + 1
            self.samples += 1
        if full:
            threading.Thread(target=self._ship, args=(full,), daemon=True).start()

    def _take(self) -> _Batch | None:
        """The buffered samples as one batch (under the lock), and an empty buffer."""
        if not self._lines:
            return None
        first = self.samples - len(self._lines) + 1
        batch = _Batch(tuple(self._lines), first, self._first_ts)
        self._lines, self._size = [], 0
        return batch

    def start(self, rate: float | None, max_bytes: int | None) -> dict[str, Any]:
        self.rate = rate if rate is not None else (self.rate or 0.1)
        self.max_bytes = max_bytes or self.max_bytes
        self.active = True
        return self.status()

    def stop(self) -> dict[str, Any]:
        self.active = False
        with self._lock:
            batch = self._take()
        if batch:
            self._ship(batch)
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "capturing": self.active,
            "rate": self.rate,
            "max_bytes": self.max_bytes,
            "samples": self.samples,
            "shipped": list(self.shipped),
        }

    def key(self, batch: _Batch) -> str:
        from cloud_sync.parts import stream_of

        stream = stream_of(
            {
                "kind": "capture",
                "ts": batch.first_ts,
                "device": self.device,
                "boot_id": f"{self.boot_id}.samples",
            }
        )
        return stream.key(batch.first, batch.first + len(batch.lines) - 1)

    def _ship(self, batch: _Batch) -> None:
        import gzip

        count = len(batch.lines)
        data = gzip.compress(b"".join(batch.lines), mtime=0)
        key = self.key(batch)
        try:
            where = self._put(key, data)
        except (EdgebentoError, OSError) as exc:
            log.warning("capture of %d samples not shipped: %s", count, exc)
            self.report({"event": "capture_failed", "samples": count, "error": str(exc)})
            return
        self.shipped.append(where)
        self.report({"event": "capture", "samples": count, "bytes": len(data), "key": where})

    def _put(self, key: str, data: bytes) -> str:
        if self.store_url:
            if self._store is None:
                from cloud_sync.store import open_store

                self._store = open_store(self.store_url)
            self._store.put_bytes(key, data)
            return key
        path = self.local_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)
