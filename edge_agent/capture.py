"""Sampled capture of inference inputs and outputs, shipped to the object store.

Capped twice: a sampling ``rate`` (share of requests kept) and ``max_bytes`` per capture file.
A full buffer is shipped and a new one begun; with no store configured files stay in
``{data_dir}/captures`` for someone to collect. Captures are JSON lines, never pickles.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelpack.errors import EdgebentoError

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


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
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.samples = 0
        self.shipped: list[str] = []
        self._store: Any = None

    def observe(self, request: Any, answer: dict[str, Any]) -> None:
        """Called after every successful inference; keeps a sampled share of them."""
        if not self.active or self._rng.random() >= self.rate:
            return
        line = json.dumps(
            {"ts": time.time(), "request": request, "answer": answer}, separators=(",", ":")
        ).encode()
        if len(line) > self.max_bytes:
            return
        full: list[bytes] | None = None
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                full, self._lines, self._size = self._lines, [], 0
            self._lines.append(line + b"\n")
            self._size += len(line) + 1
            self.samples += 1
        if full:
            threading.Thread(target=self._ship, args=(full,), daemon=True).start()

    def start(self, rate: float | None, max_bytes: int | None) -> dict[str, Any]:
        self.rate = rate if rate is not None else (self.rate or 0.1)
        self.max_bytes = max_bytes or self.max_bytes
        self.active = True
        return self.status()

    def stop(self) -> dict[str, Any]:
        self.active = False
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            self._ship(lines)
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "capturing": self.active,
            "rate": self.rate,
            "max_bytes": self.max_bytes,
            "samples": self.samples,
            "shipped": list(self.shipped),
        }

    def _key(self) -> str:
        return f"captures/{self.device}/{self.boot_id}/{time.time_ns()}.jsonl"

    def _ship(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        key = self._key()
        try:
            where = self._put(key, data)
        except (EdgebentoError, OSError) as exc:
            log.warning("capture of %d samples not shipped: %s", len(lines), exc)
            self.report({"event": "capture_failed", "samples": len(lines), "error": str(exc)})
            return
        self.shipped.append(where)
        self.report({"event": "capture", "samples": len(lines), "bytes": len(data), "key": where})

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
