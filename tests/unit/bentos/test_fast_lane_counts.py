"""The fast lane's run timeout is counted, with its reason, as the server's (issue 18)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bentos.fast_lane import FastLane


def test_a_run_timeout_is_a_504_counted_once_and_a_fast_answer_is_not() -> None:
    counted: list[str] = []
    sent: list[dict[str, Any]] = []

    async def never(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(60)

    async def fast(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for app in (never, fast):
        lane = FastLane(app, app, 0.05, lambda: counted.append("run_timeout"))
        asyncio.run(lane({"type": "http", "path": "/predict"}, receive, send))
    assert sent[0]["status"] == 504 and json.loads(sent[1]["body"])["reason"] == "run_timeout"
    assert sent[2]["status"] == 200
    assert counted == ["run_timeout"]
