"""The optional result cache: answers of one model version, keyed by a hash of the canonical
input bytes (names, dtypes, shapes and data), least recently used out first, bounded in bytes."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np


def cache_key(feed: Mapping[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(feed):
        array = np.require(feed[name], requirements="C")  # a 0-d array stays 0-d
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())  # a copy, but one per cached request
    return digest.digest()


class ResultCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        # Copies: a batch's outputs are views into one big array that must not be kept alive.
        stored = {k: np.array(v, copy=True) for k, v in outputs.items()}
        size = sum(v.nbytes for v in stored.values()) + len(key) + 64 * len(stored)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= _size(key, old)
            self._items[key] = stored
            self.bytes += size
            while self.bytes > self.max_bytes and self._items:
                k, v = self._items.popitem(last=False)
                self.bytes -= _size(k, v)


def _size(key: bytes, outputs: Mapping[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in outputs.values()) + len(key) + 64 * len(outputs)
