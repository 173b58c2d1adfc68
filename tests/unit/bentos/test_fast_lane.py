"""The fast lane: the core's paths skip BentoML's stack, keep a time limit and a JSON 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bentos.fast_lane import FastLane, in_lane, install


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def answer(self) -> tuple[int, dict[str, Any]]:
        return self.messages[0]["status"], json.loads(self.messages[1]["body"])


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _app(answer: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.dumps({"by": answer}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def _call(lane: FastLane, path: str, kind: str = "http") -> Recorder:
    sent = Recorder()
    asyncio.run(lane({"type": kind, "path": path}, _receive, sent))
    return sent


@pytest.mark.parametrize(
    ("path", "by"),
    [
        ("/predict", "core"),
        ("/infer", "core"),
        ("/metadata", "core"),
        ("/v2", "core"),
        ("/v2/models/m/infer", "core"),
        ("/v2x", "stack"),
        ("/livez", "stack"),
        ("/readyz", "stack"),
        ("/metrics", "stack"),
        ("/predict/more", "stack"),
        ("/", "stack"),
    ],
)
def test_only_the_cores_paths_take_the_lane(path: str, by: str) -> None:
    lane = FastLane(_app("stack"), _app("core"), timeout_s=5)
    assert _call(lane, path).answer() == (200, {"by": by})
    assert in_lane(path) == (by == "core")


def test_lifespan_and_websockets_go_to_the_stack() -> None:
    seen = []

    async def stack(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    lane = FastLane(stack, _app("core"), timeout_s=5)
    _call(lane, "/predict", kind="lifespan")
    _call(lane, "/predict", kind="websocket")
    assert seen == ["lifespan", "websocket"]


def test_a_request_past_its_time_limit_gets_504_and_the_work_is_cancelled() -> None:
    cancelled = []

    async def hangs(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    lane = FastLane(_app("stack"), hangs, timeout_s=0.05)
    status, doc = _call(lane, "/predict").answer()
    assert (status, doc["reason"]) == (504, "run_timeout") and cancelled == [True]


def test_a_timeout_the_app_raises_itself_is_a_500_not_a_504() -> None:
    async def raises(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise TimeoutError("a socket of its own timed out")

    lane = FastLane(_app("stack"), raises, timeout_s=5)
    assert _call(lane, "/predict").answer() == (
        500,
        {"error": "internal error", "reason": "internal"},
    )


def test_a_fault_after_the_answer_began_closes_the_connection_instead() -> None:
    async def half(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("broke mid-answer")

    lane = FastLane(_app("stack"), half, timeout_s=5)
    with pytest.raises(RuntimeError):
        _call(lane, "/predict")


def test_install_wraps_only_that_services_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from bentos import fast_lane

    monkeypatch.setattr(fast_lane, "stack_needed", lambda service: None)

    class Service:
        def to_asgi(self, is_main: bool = True) -> Any:
            return _app("stack")

    ours, other = Service(), Service()
    install(ours, _app("core"), timeout_s=5)
    assert isinstance(ours.to_asgi(is_main=True), FastLane)
    assert not isinstance(other.to_asgi(), FastLane)


@pytest.mark.parametrize(
    ("cors", "traffic", "middlewares", "reason"),
    [
        (False, {}, [], None),
        (True, {}, [], "CORS"),
        (False, {"max_concurrency": 8, "timeout": 30}, [], "max_concurrency"),
        (False, {"timeout": 30}, [("SomeMiddleware", {})], "own ASGI middleware"),
    ],
)
def test_a_feature_of_bentomls_stack_keeps_the_core_in_it(
    monkeypatch: pytest.MonkeyPatch,
    cors: bool,
    traffic: dict,
    middlewares: list,
    reason: str | None,
) -> None:
    """CORS headers, a concurrency limit or the service's own middleware come from BentoML's
    stack: with any of them on, the core's paths keep going through it."""
    from bentos import fast_lane

    class Service:
        name = "edgebento"

        def __init__(self) -> None:
            self.middlewares = middlewares

        def to_asgi(self, is_main: bool = True) -> Any:
            return _app("stack")

    ours = Service()
    monkeypatch.setattr(fast_lane, "_cors_enabled", lambda: cors)
    monkeypatch.setattr(fast_lane, "_traffic", lambda service: traffic)
    found = fast_lane.stack_needed(ours)
    assert (found is None) if reason is None else (reason in (found or ""))
    install(ours, _app("core"), timeout_s=5)
    assert isinstance(ours.to_asgi(), FastLane) == (reason is None)


def test_outside_a_worker_there_is_no_traffic_setting() -> None:
    from bentos import fast_lane

    class Service:
        name = "edgebento"

    assert fast_lane._traffic(Service()) == {}


def test_a_scrape_writes_the_counts_first_and_nothing_else_does() -> None:
    """``on_scrape`` (the refusals a worker has not written yet) runs before the stack answers
    ``/metrics``, and for no other path or scope."""
    events: list[str] = []

    def stack(by: str) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            events.append(f"{by} {scope.get('path')}")

        return app

    lane = FastLane(stack("stack"), stack("core"), 5.0, on_scrape=lambda: events.append("write"))
    for path, kind in (("/metrics", "http"), ("/predict", "http"), ("/livez", "http")):
        _call(lane, path, kind)
    asyncio.run(lane({"type": "lifespan"}, _receive, Recorder()))
    assert events == ["write", "stack /metrics", "core /predict", "stack /livez", "stack None"]
