"""The core's own paths go straight to the core, past BentoML's HTTP middleware.

BentoML wraps every request in nine layers (its request metrics, OpenTelemetry, its timeout, a
request context, error and exception handlers, a router and the mount) before the core's ASGI app
sees it. Measured on the real worker under closed-loop load, with and without this lane, they
cost the event loop 70 µs of a refusal's 156 µs and 110 µs of an accepted JSON request's 566 µs.
Under a flood, most requests are refusals, and that CPU comes out of the model's.

So ``/predict``, ``/infer``, ``/metadata`` and ``/v2/...`` are dispatched to the core before the
stack; everything else (``/livez``, ``/readyz``, ``/metrics``, BentoML's docs) goes through it
as before. What the lane keeps of the stack:

- a time limit on the whole request, as BentoML's ``traffic.timeout``: past it, a 504 with reason
  ``run_timeout``, counted (a model that never returns cannot hold a client forever; the body's
  own, shorter limit is the service's 408);
- a JSON 500 with reason ``internal`` for an exception the core did not answer itself.

What it leaves out: BentoML's ``bentoml_service_request_*`` metrics and its OpenTelemetry spans
for these paths (the core counts them in ``edgebento_*``; they were untraced by default).
``EDGEBENTO_FAST_LANE=0`` sends them through the whole stack again, and so does turning on a
feature of that stack: BentoML's CORS (``http.cors.enabled``), whose headers browsers need on
every answer, ``traffic.max_concurrency``, or middleware the service adds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentos.time_limits import REQUEST_LIMITS

log = logging.getLogger(__name__)

LANE_PATHS = ("/predict", "/infer", "/metadata")
METRICS_PATH = "/metrics"  # BentoML's scrape, through the stack: ``on_scrape`` runs first
_taken = False  # a FastLane was made for the service (its scrapes go through ``on_scrape``)


def taken() -> bool:
    return _taken


def in_lane(path: str) -> bool:
    return path in LANE_PATHS or path == "/v2" or path.startswith("/v2/")


class FastLane:
    """``stack`` (BentoML's app) for every path but the core's, which ``core_app`` answers."""

    def __init__(
        self,
        stack: ASGIApp,
        core_app: ASGIApp,
        timeout_s: float,
        on_timeout: Callable[[], None] | None = None,
        on_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.stack, self.core_app, self.timeout_s = stack, core_app, timeout_s
        self.on_timeout = on_timeout  # counts a run timeout (the core's metrics)
        self.on_scrape = on_scrape  # writes the counts not yet written, before a scrape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not in_lane(scope["path"]):
            if self.on_scrape is not None and scope.get("path") == METRICS_PATH:
                self.on_scrape()
            await self.stack(scope, receive, send)
            return
        started = False

        def tracked(message: Message) -> Awaitable[None]:
            # send's own awaitable, handed back (not awaited in a coroutine of ours): a frame
            # less per message.
            nonlocal started
            started = True
            return send(message)

        limit = REQUEST_LIMITS.arm(self.timeout_s)
        try:
            await self.core_app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not REQUEST_LIMITS.end(limit):
                raise  # not ours: the client went away, or the worker stops
            if started:  # the answer is half sent: closing the connection is all that is left
                raise TimeoutError(f"the answer was not sent in {self.timeout_s:g} s") from None
            if self.on_timeout is not None:
                self.on_timeout()
            doc = {
                "error": f"the request was not answered in {self.timeout_s:g} s",
                "reason": "run_timeout",
            }
            await _json(send, 504, doc)
        except Exception as exc:
            REQUEST_LIMITS.end(limit)
            log.error("request failed: %s", exc, exc_info=exc)
            if started:
                raise
            await _json(send, 500, {"error": "internal error", "reason": "internal"})
        else:
            REQUEST_LIMITS.end(limit)


async def _json(send: Send, status: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(
    service: Any,
    core_app: ASGIApp,
    timeout_s: float,
    on_timeout: Callable[[], None] | None = None,
    early: Any = None,
    on_scrape: Callable[[], None] | None = None,
) -> None:
    """Make ``service``'s ASGI app (what BentoML's worker hands uvicorn) a ``FastLane``; with
    ``early`` (``protocol_refusal.Check``), the lane's refusals answered by uvicorn's protocol
    too (``bentos/protocol_refusal.py``), where the lane is taken; ``on_scrape`` before each
    ``/metrics`` the worker serves (``taken()`` says whether it will be called)."""
    cls = type(service)
    original = cls.to_asgi

    @functools.wraps(original)
    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> ASGIApp:
        stack = original(self, *args, **kwargs)
        if self is not service:
            return stack
        reason = stack_needed(self)
        if reason:
            log.info("%s: the core's paths go through BentoML's middleware", reason)
            return stack
        if early is not None:
            from bentos import protocol_refusal

            protocol_refusal.install(early)
        global _taken
        _taken = True
        return FastLane(stack, core_app, timeout_s, on_timeout, on_scrape)

    cls.to_asgi = to_asgi


def stack_needed(service: Any) -> str | None:
    """Why the core's paths must keep BentoML's middleware: a feature of it the user turned on
    (CORS, whose headers browsers need on every answer; a concurrency limit; middleware the
    service added). None: the lane may take them."""
    if _cors_enabled():
        return "BentoML's CORS is on"
    if _traffic(service).get("max_concurrency"):
        return "BentoML's traffic.max_concurrency is set"
    if getattr(service, "middlewares", None):
        return "the service adds its own ASGI middleware"
    return None


def _cors_enabled() -> bool:
    from bentoml._internal.container import BentoMLContainer

    return bool(BentoMLContainer.http.cors.enabled.get())


def _traffic(service: Any) -> dict[str, Any]:
    """The service's traffic settings as BentoML's app factory reads them (config file over
    the decorator); empty where there is no loaded configuration (outside a worker)."""
    from bentoml._internal.container import BentoMLContainer

    try:
        services = BentoMLContainer.config.services.get()
    except (KeyError, AttributeError):
        return {}
    return dict((services.get(getattr(service, "name", "")) or {}).get("traffic") or {})
