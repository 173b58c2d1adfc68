"""The bounded queue of the threaded targets (the agent's MQTT workers, its HTTP endpoint and
pipelines; Lambda): at most ``running`` requests run at once, at most ``max_queue`` wait, and
none waits past its deadline."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from modelpack.errors import OverloadError
from modelpack.serving.batching import QueueMetrics


class Gate:
    def __init__(
        self, running: int, max_queue: int, retry_after_s: int, metrics: QueueMetrics
    ) -> None:
        self.running = max(1, running)
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._active = 0
        self._waiting = 0

    @property
    def depth(self) -> int:
        return self._waiting

    def full(self) -> bool:
        return self._active >= self.running and self._waiting >= self.max_queue

    @contextlib.contextmanager
    def slot(self, deadline: float, arrived: float | None = None) -> Iterator[None]:
        """Hold one of the running slots; OverloadError when none frees up before ``deadline``
        (``time.monotonic()``) or the queue is already full."""
        arrived = time.monotonic() if arrived is None else arrived
        with self._cond:
            if self._active >= self.running:
                if self._waiting >= self.max_queue:
                    raise self._refuse("queue_full", arrived)
                self._waiting += 1
                self.metrics.queue_depth(self._waiting)
                try:
                    while self._active >= self.running:
                        left = deadline - time.monotonic()
                        timed_out = left <= 0 or not self._cond.wait(left)
                        if timed_out and self._active >= self.running:
                            raise self._refuse("deadline", arrived)
                finally:
                    self._waiting -= 1
                    self.metrics.queue_depth(self._waiting)
            elif time.monotonic() > deadline:
                raise self._refuse("deadline", arrived)
            self._active += 1
        self.metrics.queue_wait(time.monotonic() - arrived)
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify()

    def _refuse(self, reason: str, arrived: float) -> OverloadError:
        if reason == "queue_full":
            message = (
                f"the model's queue is full ({self.max_queue} requests waiting); retry shortly"
            )
        else:
            waited = time.monotonic() - arrived
            message = f"the request waited {waited:.3f} s, past its deadline; retry shortly"
        return OverloadError(message, reason=reason, retry_after_s=self.retry_after_s)
