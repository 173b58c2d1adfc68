"""BentoML's TimeoutMiddleware, as the service installs it: no timer outlives its request, and a
request that does not answer in time still gets BentoML's 504."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from bentos import bentoml_fixes


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _never(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(60)


async def _requests(app: Any, n: int) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    for _ in range(n):
        await app({"type": "http", "path": "/predict"}, receive, send)
    return sent


def _live_timers_after(n: int) -> int:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_requests(TimeoutMiddleware(_ok, timeout=30), n))
        return sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_no_request_leaves_its_timer_behind() -> None:
    bentoml_fixes.install()
    assert _live_timers_after(500) == 0


def test_a_request_past_the_timeout_still_gets_a_504() -> None:
    bentoml_fixes.install()
    sent = asyncio.run(_requests(TimeoutMiddleware(_never, timeout=0.05), 1))
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]
