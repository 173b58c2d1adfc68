"""The HTTP surface of the core, whatever carries it (BentoML, a Lambda event, the agent's
local server): tensor JSON on ``POST /predict``, the Open Inference Protocol under ``/v2``.

    POST /predict                                   tensor JSON (``/infer`` on the agent too)
    GET  /metadata                                  the pack's manifest and io signature
    GET  /v2   /v2/health/live   /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}][/ready]
    POST /v2/models/{name}[/versions/{v}]/infer     JSON, or Triton's binary extension
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelpack.codec import dumps
from modelpack.errors import EdgebentoError, InputError, OverloadError
from modelpack.serving import oip
from modelpack.serving.core import Job, Protocol, ServingCore
from modelpack.serving.model import ServedModel
from modelpack.serving.reasons import (
    STATUS_BY_REASON,
    NotFoundRoute,
    error_doc,
    retry_headers,
    status_of,
)

if TYPE_CHECKING:
    from modelpack.serving.reservation import Reservation

log = logging.getLogger(__name__)

SERVER = {"name": "edgebento", "version": "1", "extensions": ["binary_tensor_data"]}
PREDICT_PATHS = ("/predict", "/infer")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes | bytearray = b""
    arrived: float | None = None  # time.monotonic() when the request began to arrive


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> HttpResponse:
        return cls(status, dumps(doc), {"content-type": "application/json", **(headers or {})})

    def doc(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Route:
    """What a path asks for: an inference (tensor or OIP) or a read-only document."""

    infer: Protocol | None
    name: str | None = None
    version: str | None = None
    what: str = ""  # for documents: metadata, server, live, ready, model, model_ready


def match(method: str, path: str) -> Route:
    path = path.rstrip("/") or "/"
    parts = path.split("/")[1:]
    if path in PREDICT_PATHS:
        return _only("POST", method, path, Route("tensor"))
    if path == "/metadata":
        return _only("GET", method, path, Route(None, what="metadata"))
    if path in ("/livez", "/readyz"):
        return _only("GET", method, path, Route(None, what=path[1:]))
    if parts[:1] != ["v2"]:
        raise NotFoundRoute(f"no such path {path}")
    rest = parts[1:]
    if not rest:
        return _only("GET", method, path, Route(None, what="server"))
    if rest in (["health", "live"], ["health", "ready"]):
        return _only("GET", method, path, Route(None, what=rest[1]))
    if rest[0] != "models" or len(rest) < 2:
        raise NotFoundRoute(f"no such path {path}")
    name, tail, version = rest[1], rest[2:], None
    if tail[:1] == ["versions"] and len(tail) >= 2:
        version, tail = tail[1], tail[2:]
        if not version:  # /versions//infer: no version is not "any version"
            raise NotFoundRoute(f"no such path {path}")
    if not tail:
        return _only("GET", method, path, Route(None, name, version, "model"))
    if tail == ["ready"]:
        return _only("GET", method, path, Route(None, name, version, "model_ready"))
    if tail == ["infer"]:
        return _only("POST", method, path, Route("oip", name, version))
    raise NotFoundRoute(f"no such path {path}")


def _only(allowed: str, method: str, path: str, route: Route) -> Route:
    method = method.upper()
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise InputError(f"{method} {path}: use {allowed}", reason="method")
    return route


def document(core: ServingCore, route: Route) -> HttpResponse:
    """The read-only endpoints (they never touch the queue)."""
    if route.what in ("server",):
        return HttpResponse.json(200, SERVER)
    if route.what in ("live", "livez"):
        return HttpResponse.json(200, {"live": True})
    if route.what in ("ready", "readyz"):
        ready = core.model is not None
        return HttpResponse.json(200 if ready else 503, {"ready": ready})
    if route.what == "model_ready":
        try:
            core.live(route.name, route.version)
        except NotFoundRoute:
            raise
        except EdgebentoError:
            return HttpResponse.json(503, {"name": route.name, "ready": False})
        return HttpResponse.json(200, {"name": route.name, "ready": True})
    model = core.live(route.name, route.version)
    if route.what == "model":
        return HttpResponse.json(
            200,
            oip.model_metadata(
                model.name, model.version, list(model.inputs.values()), model.output_specs()
            ),
        )
    return HttpResponse.json(200, model.metadata())


def refuse(core: ServingCore, exc: BaseException, counted: bool = True) -> HttpResponse:
    """The one error answer: ``{"error", "reason"}`` with the status of the reason table."""
    if counted:
        core.count_error(exc)
    if type(exc) is OverloadError and STATUS_BY_REASON.get(exc.reason) == 503:
        return _overloaded(exc)
    status = status_of(exc)
    if status == 500:  # ours, never the client's: keep the whole story for the operator
        log.error("request failed: %s", exc, exc_info=exc)
    return HttpResponse.json(status, error_doc(exc), retry_headers(exc))


# Under a flood most answers are 503s that differ only in their message: their status, the
# document's tail and the headers are built once per (reason, Retry-After), not per refusal.
_OVERLOADED: dict[tuple[str, int], tuple[int, bytes, dict[str, str]]] = {}


def _overloaded(exc: OverloadError) -> HttpResponse:
    """Byte for byte ``HttpResponse.json(status_of(exc), error_doc(exc), retry_headers(exc))``."""
    key = (exc.reason, exc.retry_after_s)
    built = _OVERLOADED.get(key)
    if built is None:
        doc = error_doc(exc)
        tail = dumps({"reason": doc["reason"], "retry_after_s": doc["retry_after_s"]})
        headers = {"content-type": "application/json", **retry_headers(exc)}
        built = _OVERLOADED[key] = (status_of(exc), b"," + tail[1:], headers)
    status, tail, headers = built
    # json.dumps of the message alone writes it as dumps writes it inside the document.
    body = b'{"error":' + json.dumps(str(exc)).encode() + tail
    return HttpResponse(status, body, dict(headers))


def decoded(body: bytes | bytearray, encoding: str | None, cap: int) -> bytes | bytearray:
    """The body without its Content-Encoding (tritonclient's ``request_compression_algorithm``
    sends gzip or deflate), inflated no further than ``cap``: a zip bomb is a 413, not a dead
    worker. Exactly one gzip member or zlib stream, with nothing after it: a reader that takes
    every member (a proxy, a WAF) would see another body than the one that runs."""
    import zlib

    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise InputError(f"Content-Encoding {encoding!r}: send gzip, deflate or none", "invalid")
    inflater = zlib.decompressobj(wbits=31 if name == "gzip" else 15)
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise InputError(f"the body is not valid {name}: {exc}", reason="invalid") from exc
    if len(out) > cap:
        raise InputError(f"the body inflates past the cap of {cap} bytes", reason="too_large")
    if not inflater.eof:
        raise InputError(f"the {name} body is cut short", reason="invalid")
    if inflater.unused_data:
        raise InputError(
            f"{len(inflater.unused_data)} bytes follow the end of the {name} "
            f"{'member' if name == 'gzip' else 'stream'}; send exactly one",
            reason="invalid",
        )
    return out


# The routes ``admit`` matched, by (method, path): a flood sends the same few paths.
_ROUTES: dict[tuple[str, str], Route] = {}
MAX_ROUTES_KEPT = 64


def _inference(core: ServingCore, method: str, path: str) -> tuple[Route, ServedModel] | None:
    """The route and live model of an inference request; None for anything else, or a fault
    (path, model) that ``handle`` answers."""
    try:
        route = _ROUTES.get((method, path))
        if route is None:
            route = match(method, path)
            if len(_ROUTES) < MAX_ROUTES_KEPT:  # paths are the client's: a bounded memory
                _ROUTES[(method, path)] = route
        if route.infer is None:
            return None
        return route, core.live(route.name, route.version)
    except EdgebentoError:
        return None


def admit(
    core: ServingCore, method: str, path: str, headers: Mapping[str, str], arrived: float
) -> Route | None:
    """Before the body is read: OverloadError for an inference the model's queue cannot start
    in time. Every other fault (path, model, headers, body) is left to ``handle``. Returns the
    route of an admitted inference (``handle`` then neither matches it nor admits it again:
    the queue checks it once more when the request is submitted)."""
    found = _inference(core, method, path)
    if found is None or not core.admit(found[1], headers, arrived):
        return None
    return found[0]


def early(
    core: ServingCore, method: str, path: str, headers: Mapping[str, str], arrived: float
) -> OverloadError | Reservation | None:
    """The OverloadError ``admit`` would raise, returned (a raise costs a traceback and its
    frames, under a flood on most requests), for a server that answers refusals before it
    builds the request (``headers``: only ``TIMEOUT_HEADER`` is read); for an inference it
    admits, a Reservation: a place held in the model's queue until the request is admitted
    again with its body (``admit``, after releasing it); None for anything else."""
    found = _inference(core, method, path)
    if found is None:
        return None
    refused = core.refusal(found[1], headers, arrived)
    return refused if refused is not None else found[1].batcher.reserve()


def _job(core: ServingCore, route: Route, request: HttpRequest, admitted: bool = False) -> Job:
    assert route.infer is not None
    model = core.live(route.name, route.version)
    body = decoded(
        request.body, request.headers.get("content-encoding"), core.limits.max_body_bytes
    )
    return core.prepare(
        route.infer,
        body,
        headers=request.headers,
        model=model,
        arrived=request.arrived,
        admitted=admitted,
    )


def _done(core: ServingCore, job: Job) -> HttpResponse:
    body, headers = core.encode(job)
    return HttpResponse(200, body, headers)


async def handle(
    core: ServingCore, request: HttpRequest, admitted: Route | None = None
) -> HttpResponse:
    """An HTTP request to its answer, batched (BentoML's event loop). ``admitted``: its route
    as ``admit`` returned it, just before its body was read."""
    try:
        route = admitted or match(request.method, request.path)
        if route.infer is None:
            return document(core, route)
        return _done(core, await core.run(_job(core, route, request, admitted is not None)))
    except Exception as exc:
        return refuse(core, exc)


def handle_sync(core: ServingCore, request: HttpRequest) -> HttpResponse:
    """An HTTP request to its answer, in the calling thread (Lambda, the agent)."""
    try:
        route = match(request.method, request.path)
        if route.infer is None:
            return document(core, route)
        return _done(core, core.run_sync(_job(core, route, request)))
    except Exception as exc:
        return refuse(core, exc)
