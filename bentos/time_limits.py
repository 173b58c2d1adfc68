"""Per-request time limits checked by one sweeping timer per event loop, not a timer per request.

``asyncio.timeout`` schedules and cancels a timer per request, and a request had two (the body's
limit, the whole request's); profiled on the small MLP at 64 clients they cost the worker about
8% of its CPU. The limits here are seconds long (the body's 10 s, a run's 30 s), so checking
them every ``PERIOD_S`` is exact enough: a limit fires at most one period late. A limit that
passes cancels its task, as ``asyncio.timeout`` does, and ``expired`` tells that cancellation
from any other (the client going away, the worker shutting down).
"""

from __future__ import annotations

import asyncio

PERIOD_S = 0.025


class Limit:
    """One task's limit: armed by ``Limits.arm``, always ended by ``Limits.end``."""

    __slots__ = ("cancelling", "fired", "task", "when")

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task, self.when, self.fired = task, when, False
        self.cancelling = task.cancelling()  # cancellations requested before ours


class Limits:
    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self._armed: dict[Limit, None] = {}  # insertion-ordered set: O(1) arm and end
        # The loops a sweep is due on (tests run several in turn; a loop is dropped when its
        # last sweep finds nothing armed on it).
        self._sweeping: set[asyncio.AbstractEventLoop] = set()

    def arm(self, seconds: float) -> Limit:
        """A limit ``seconds`` from now on the running task."""
        task = asyncio.current_task()
        assert task is not None, "a time limit needs a running task"
        loop = task.get_loop()
        limit = Limit(task, loop.time() + seconds)
        self._armed[limit] = None
        if loop not in self._sweeping:
            self._sweeping.add(loop)
            loop.call_later(self.period_s, self._sweep, loop)
        return limit

    def end(self, limit: Limit) -> bool:
        """Disarm ``limit``; True when it fired and its cancellation is the one being raised
        (then it is taken back: the caller answers the timeout instead)."""
        self._armed.pop(limit, None)
        return limit.fired and limit.task.uncancel() <= limit.cancelling

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        live = False
        for limit in list(self._armed):
            if limit.task.get_loop() is not loop:
                continue  # another loop's: its own sweep sees it
            live = True
            if limit.when <= now and not limit.fired:
                # A task that already finished cannot be cancelled: its limit did not fire.
                limit.fired = limit.task.cancel()
        if live and not loop.is_closed():
            loop.call_later(self.period_s, self._sweep, loop)
        else:
            self._sweeping.discard(loop)


REQUEST_LIMITS = Limits()  # the worker's: one sweep for the fast lane's and the body's limits
