"""How long a request waited before the server read it, as well as the server can tell.

The client's clock starts when it connects and sends; the server's when uvicorn hands it the
request. Between them the bytes wait in the socket while the event loop works through what came
before (under a flood: hundreds of refusals, answers, the collector). A timer the loop should run
every ``PERIOD`` runs that much late, so its lateness is the wait a request read now has had:
the deadline counts it (issue 18: counted from the server's read, answers reached the client
later than the deadline plus one batch).
"""

from __future__ import annotations

import asyncio

PERIOD_S = 0.01
DECAY = 0.8  # a tick's lateness counts for about five ticks (50 ms) after it


class LoopLag:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._late = 0.0

    def behind(self) -> float:
        """Seconds the running loop is behind its timers now (starts the probe on first use)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (tests, a restarted worker)
            self._loop, self._late = loop, 0.0
            loop.call_later(PERIOD_S, self._tick, loop, loop.time() + PERIOD_S)
        return self._late

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if loop is not self._loop or loop.is_closed():
            return
        now = loop.time()
        self._late = max(now - due, self._late * DECAY, 0.0)
        loop.call_later(PERIOD_S, self._tick, loop, now + PERIOD_S)
