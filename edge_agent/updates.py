"""The update worker: one thread for installs (downloads included), each cancellable.

Deploys and desired states run here one at a time, so a slow download never delays a command,
a ping, an inference or a rollback (those run elsewhere). Each job gets a ``CancelToken``; the
download checks it between chunks together with the overall deadline, and a ``cancel`` command
or a rollback sets it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from modelpack.errors import EdgebentoError

log = logging.getLogger(__name__)


class CancelledError(EdgebentoError):
    """The update was cancelled (a ``cancel`` command, a rollback, or the agent stopping)."""


class DeadlineError(EdgebentoError):
    """The download did not finish within its overall deadline."""


class CancelToken:
    def __init__(self, deadline_s: float | None = None) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, what: str) -> None:
        """Raise if the job was cancelled or is past its deadline."""
        if self._event.is_set():
            raise CancelledError(f"{what} cancelled: {self.reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineError(f"{what} did not finish within its deadline")

    def remaining(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        return max(0.01, min(cap, self.deadline - time.monotonic()))


class UpdateWorker:
    def __init__(self, deadline_s: Callable[[], float]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="update")
        self._deadline_s = deadline_s
        self._lock = threading.Lock()
        self.token = CancelToken()
        self.running: str | None = None
        self.desired: Callable[[bytes], Any] | None = None

    def submit(self, job: Callable[[], Any], what: str = "update") -> None:
        self._pool.submit(self._run, job, what)

    def submit_desired(self, payload: bytes) -> None:
        if self.desired is not None:
            handler = self.desired
            self.submit(lambda: handler(payload), "desired state")

    def _run(self, job: Callable[[], Any], what: str) -> None:
        with self._lock:
            self.token = CancelToken(self._deadline_s())
            self.running = what
        try:
            job()
        except Exception:  # a job reports its own outcome; a bug must not end the worker
            log.exception("%s failed", what)
        finally:
            with self._lock:
                self.running = None

    def cancel(self, reason: str) -> str | None:
        """Cancel the job in progress; what it was (None when idle)."""
        with self._lock:
            if self.running is not None:
                self.token.cancel(reason)
            return self.running

    def shutdown(self) -> None:
        self.cancel("the agent is stopping")
        self._pool.shutdown(wait=True, cancel_futures=True)
