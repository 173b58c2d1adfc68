"""One table of ``reason`` -> HTTP status, for every target (MQTT carries the same reason)."""

from __future__ import annotations

from typing import Any

from modelpack.errors import MAX_MESSAGE_CHARS, EdgebentoError, InputError, OverloadError, clip

# Every refusal names one of these reasons. A reason not listed is a 400 if it is the client's.
STATUS_BY_REASON: dict[str, int] = {
    "empty_body": 400,
    "invalid_json": 400,
    "invalid": 400,
    "dtype": 400,
    "shape": 400,
    "rows": 400,
    "unknown_input": 400,
    "missing_input": 400,
    "unknown_output": 400,
    "too_large": 413,
    "batch_too_large": 413,
    "not_found": 404,
    "method": 405,
    "timeout": 408,
    "length_required": 411,
    "queue_full": 503,
    "deadline": 503,
    "not_ready": 503,
    "load_failed": 503,
    "internal": 500,
    "run_timeout": 504,
}


class NotFoundRoute(InputError):
    """No such path, model or version (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_found")


class NotReadyError(EdgebentoError):
    """No model is loaded (yet, or it could not be): 503."""

    def __init__(self, message: str, reason: str = "not_ready") -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, InputError | OverloadError | NotReadyError):
        return exc.reason
    return "internal"


def status_of(exc: BaseException) -> int:
    reason = reason_of(exc)
    if isinstance(exc, InputError):
        return STATUS_BY_REASON.get(reason, 400)
    return STATUS_BY_REASON.get(reason, 500)


def message_of(exc: BaseException) -> str:
    """What the client is told: our own one-line message, never a stray exception's text, and
    never longer than ``MAX_MESSAGE_CHARS`` whatever of the request it quotes."""
    return (
        clip(str(exc), MAX_MESSAGE_CHARS) if isinstance(exc, EdgebentoError) else "internal error"
    )


def error_doc(exc: BaseException) -> dict[str, Any]:
    doc: dict[str, Any] = {"error": message_of(exc), "reason": reason_of(exc)}
    if isinstance(exc, OverloadError):
        doc["retry_after_s"] = exc.retry_after_s
    return doc


def retry_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, OverloadError):
        return {"retry-after": str(exc.retry_after_s)}
    if isinstance(exc, NotReadyError):
        return {"retry-after": "5"}
    return {}
