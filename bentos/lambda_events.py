"""The shapes of Lambda events and answers: direct invocation and the four HTTP front doors.

API Gateway REST (payload v1), HTTP API (v2), Lambda function URLs (v2 as well) and ALB all send
the body as a string, base64-encoded when ``isBase64Encoded`` is true, and expect
``statusCode``, ``headers`` and a string ``body`` back; ALB also wants ``statusDescription``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from modelpack.errors import InputError

Source = Literal["direct", "rest", "http", "alb"]


@dataclass(frozen=True)
class HttpRequest:
    source: Source
    method: str
    path: str
    body: bytes | None


def event_source(event: Any) -> Source:
    if not isinstance(event, Mapping):
        return "direct"
    context = event.get("requestContext")
    if isinstance(context, Mapping) and "elb" in context:
        return "alb"
    if event.get("version") == "2.0" and isinstance(context, Mapping) and "http" in context:
        return "http"  # HTTP API v2 and function URLs send the same payload
    if "httpMethod" in event and isinstance(context, Mapping):
        return "rest"
    return "direct"


def _body(event: Mapping[str, Any]) -> bytes | None:
    raw = event.get("body")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InputError("the event body must be a string", reason="invalid")
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(
                "the body is marked isBase64Encoded but is not base64", reason="invalid"
            ) from exc
    return raw.encode()


def http_request(event: Mapping[str, Any], source: Source) -> HttpRequest:
    """Method, path and the decoded body of an HTTP event (raises InputError on a bad body)."""
    if source == "http":
        http = event["requestContext"]["http"]
        method, path = str(http.get("method", "POST")), str(event.get("rawPath") or "/")
    else:
        method, path = str(event.get("httpMethod", "POST")), str(event.get("path") or "/")
    return HttpRequest(source, method.upper(), path, _body(event))


def http_response(
    source: Source, status: int, body: Any, content_type: str = "application/json"
) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(body)
    answer: dict[str, Any] = {
        "statusCode": status,
        "headers": {"Content-Type": content_type},
        "body": text,
        "isBase64Encoded": False,
    }
    if source == "alb":
        answer["statusDescription"] = f"{status} {HTTPStatus(status).phrase}"
    return answer
