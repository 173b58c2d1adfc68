"""The shapes of Lambda events and answers: direct invocation and the four HTTP front doors.

API Gateway REST (payload v1), HTTP API (v2), Lambda function URLs (v2 as well) and ALB all send
the body as a string, base64-encoded when ``isBase64Encoded`` is true, and expect
``statusCode``, ``headers`` and a string ``body`` back (base64 for binary answers); ALB also
wants ``statusDescription``. An event that claims one of these shapes but does not follow it is
refused with a 400, never an exception.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from modelpack.errors import InputError, first_problem
from modelpack.serving.routes import HttpRequest, HttpResponse

Source = Literal["direct", "rest", "http", "alb"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    headers: dict[str, str | None] | None = None
    multiValueHeaders: dict[str, list[str | None] | None] | None = None
    body: str | None = None
    isBase64Encoded: bool = False


class _V1(_Event):
    httpMethod: str
    path: str = "/"


class _HttpContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: str
    path: str | None = None


class _V2Context(BaseModel):
    model_config = ConfigDict(extra="allow")
    http: _HttpContext
    stage: str | None = None


class _V2(_Event):
    rawPath: str = "/"
    requestContext: _V2Context


def event_source(event: Any) -> Source:
    if not isinstance(event, Mapping):
        return "direct"
    context = event.get("requestContext")
    if isinstance(context, Mapping) and "elb" in context:
        return "alb"
    if event.get("version") == "2.0" and isinstance(context, Mapping):
        return "http"  # HTTP API v2 and function URLs send the same payload
    if "httpMethod" in event and isinstance(context, Mapping):
        return "rest"
    return "direct"


def _headers(event: _Event) -> dict[str, str]:
    headers = {k.lower(): v for k, v in (event.headers or {}).items() if v is not None}
    for name, values in (event.multiValueHeaders or {}).items():
        if values and values[-1] is not None:
            headers.setdefault(name.lower(), values[-1])
    return headers


def _body(event: _Event) -> bytes:
    if event.body is None:
        return b""
    if event.isBase64Encoded:
        try:
            return base64.b64decode(event.body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(
                "the body is marked isBase64Encoded but is not base64", reason="invalid"
            ) from exc
    try:
        return event.body.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in the event's JSON)
        raise InputError(
            f"the body is not valid Unicode: {exc.reason} at character {exc.start}",
            reason="invalid",
        ) from exc


def http_request(event: Mapping[str, Any], source: Source) -> HttpRequest:
    """The HTTP request an event carries; InputError (a 400) when it is malformed."""
    try:
        if source == "http":
            v2 = _V2.model_validate(event)
            path, stage = v2.rawPath, v2.requestContext.stage
            if stage and stage != "$default" and path.startswith(f"/{stage}/"):
                path = path[len(stage) + 1 :]  # a named stage prefixes the raw path
            return HttpRequest(v2.requestContext.http.method.upper(), path, _headers(v2), _body(v2))
        v1 = _V1.model_validate(event)
        return HttpRequest(v1.httpMethod.upper(), v1.path, _headers(v1), _body(v1))
    except ValidationError as exc:
        raise InputError(
            f"a malformed {source} event: {first_problem(exc, 'event')}", reason="invalid"
        ) from exc


def http_response(source: Source, answer: HttpResponse, multi: bool = False) -> dict[str, Any]:
    """The answer in the event's shape. ``multi``: the event came with ``multiValueHeaders``
    (an ALB target group with multi-value headers on, which then ignores ``headers`` in the
    answer and would drop the content type; API Gateway v1 takes either)."""
    binary = not answer.headers.get("content-type", "").startswith(("application/json", "text/"))
    result: dict[str, Any] = {
        "statusCode": answer.status,
        "headers": dict(answer.headers),
        "body": base64.b64encode(answer.body).decode() if binary else answer.body.decode(),
        "isBase64Encoded": binary,
    }
    if multi and source in ("alb", "rest"):
        result["multiValueHeaders"] = {k: [v] for k, v in answer.headers.items()}
        if source == "alb":
            del result["headers"]  # ALB refuses an answer with both
    if source == "alb":
        result["statusDescription"] = f"{answer.status} {HTTPStatus(answer.status).phrase}"
    return result
