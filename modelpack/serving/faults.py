"""Whose fault a failed run is: the client's (4xx) or the model's (5xx).

The rule (docs/serving.md): when ONNX Runtime fails on a request, the model runs a known-good
input again. If that input still runs, the failure is the request's own (a 400, counted as
``rejected``, never in the error rate a rollout reads); if it fails too, or nothing is known to
run, the model is broken (a 500, counted as an error). The known-good input is an input of the
request's shape class that ran (the first), where the class is every input's full shape and
dtype, the batch dim included (a model whose batch must be a multiple of 3 runs 3 rows and fails on 1), or
else the pack's golden samples, or else the smallest input that ran.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

ShapeClass = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]
Feed = Mapping[str, np.ndarray]

MAX_CLASSES = 256  # shape classes remembered (least recently used out)
MAX_KEPT_BYTES = 1 << 20  # an input larger than this is not kept (its class falls back)
MAX_TOTAL_BYTES = 16 << 20  # all kept inputs together (least recently used out)


def shape_class(feed: Feed) -> ShapeClass:
    # Once per request: the dtype itself (its name is a slow property), sorted by name only.
    return tuple(sorted(((k, v.dtype, v.shape) for k, v in feed.items()), key=_first))


def _first(item: tuple[str, Any, Any]) -> str:
    return item[0]


def _nbytes(feed: Feed) -> int:
    return sum(int(v.nbytes) for v in feed.values())


class KnownGood:
    """Inputs the model is known to answer, by shape class: copies, bounded in count and bytes."""

    def __init__(self, samples: Feed | None = None) -> None:
        self._lock = threading.Lock()
        self._by_class: OrderedDict[ShapeClass, dict[str, np.ndarray]] = OrderedDict()
        self._samples = {k: np.asarray(v) for k, v in samples.items()} if samples else None
        self._smallest: ShapeClass | None = None
        self._bytes = 0

    def remember(self, feed: Feed) -> None:
        """After a successful run: keep the first input of a class not seen yet (the model is
        deterministic, so any input that ran once tells as much as the last one)."""
        key = shape_class(feed)
        with self._lock:
            if key in self._by_class:
                self._by_class.move_to_end(key)
                return
        size = _nbytes(feed)
        if size > MAX_KEPT_BYTES:
            return
        # Kept in this process's memory only (never written, logged or sent): a client's input
        # is the evidence that the model runs inputs of its class.
        copy = {k: np.array(v, copy=True) for k, v in feed.items()}
        with self._lock:
            if key in self._by_class:
                return
            self._by_class[key] = copy
            self._bytes += size
            while len(self._by_class) > MAX_CLASSES or self._bytes > MAX_TOTAL_BYTES:
                gone, kept = self._by_class.popitem(last=False)
                self._bytes -= _nbytes(kept)
                if gone == self._smallest:
                    self._smallest = None
            smallest = self._by_class.get(self._smallest) if self._smallest else None
            if smallest is None or size < _nbytes(smallest):
                self._smallest = key

    def reference(self, feed: Feed) -> tuple[ShapeClass, Feed] | None:
        """The known-good input to try again for a failed ``feed``; None when nothing is known
        to run."""
        key = shape_class(feed)
        with self._lock:
            same = self._by_class.get(key)
            if same is not None:
                return key, same
            if self._samples is not None:
                return shape_class(self._samples), self._samples
            if self._smallest is not None and self._smallest in self._by_class:
                return self._smallest, self._by_class[self._smallest]
        return None

    def still_runs(self, feed: Feed, run: Callable[[dict[str, np.ndarray]], Any]) -> bool:
        """Whether the known-good input for ``feed`` runs now (False when there is none). It
        runs again for every failure, never from a verdict kept for a while: a model that fails
        now and then (its memory, a flaky op) would otherwise pass its failures off as the
        clients' for as long as the verdict was kept. A failure costs at most one more run."""
        found = self.reference(feed)
        if found is None:
            return False
        try:
            run(dict(found[1]))
        except Exception:
            return False
        return True
