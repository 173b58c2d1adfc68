"""A fix to BentoML 1.4's own request timeout, applied when the service is imported.

``TimeoutMiddleware`` (``bentoml._internal.server.http.traffic``) schedules a timer for each
request with ``loop.call_later(timeout, ...)`` and never cancels it: every request leaves its
timer, a future and a context alive for the whole timeout (30 s here). Under a flood of 2,800
requests a second that is 84,000 live timers: the worker's RSS grew 30 MB per 8 s flood, and
the garbage collector, walking them all with the GIL held, stalled the event loop and the
model's thread for long enough to cut goodput by a fifth from one flood to the next. The same
middleware, with the timer cancelled once the response has started, is installed in its place.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.server.http import traffic


async def _call(self: Any, scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
            timer.cancel()
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            from starlette.responses import JSONResponse

            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()


def install() -> None:
    traffic.TimeoutMiddleware.__call__ = _call  # type: ignore[method-assign]
