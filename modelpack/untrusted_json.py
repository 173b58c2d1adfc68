"""JSON that someone else wrote, parsed with one error for everything that makes it unusable.

Import path and API::

    from modelpack.untrusted_json import NotJsonError, loads
    doc = loads(data, "rollouts/r1.json")               # any JSON value, or NotJsonError
    doc = loads(data, "report.json", finite=True)        # also refuses NaN, Infinity and 1e999

``json.loads`` refuses bad input with more than ``JSONDecodeError``: an integer literal of over
4,300 digits raises a plain ``ValueError`` (Python's int max str digits), arrays nested some
thousand deep raise ``RecursionError``, and bytes that are not UTF-8 (or UTF-16/32) raise
``UnicodeDecodeError``. A reader that caught only the first crashed on the others: one object a
bucket writer planted stopped every CRL write, the enrollment service and the /metrics scrape.
Here all of them are ``NotJsonError``, which each caller turns into its own refusal.

``finite=True`` is for documents whose numbers feed a decision: ``NaN`` compares false with
every bound, so a threshold checked as ``value > limit`` passes it, and ``1e999`` parses to
infinity. Python's parser takes both; strict JSON has neither.
"""

from __future__ import annotations

import json
import math
from typing import Any

from modelpack.errors import EdgebentoError, clip

__all__ = ["NotJsonError", "loads"]


class NotJsonError(EdgebentoError, ValueError):
    """Input that is not the JSON it should be: malformed, not text, too deep, an integer past
    Python's digit limit, or (when asked) a number that is not finite.

    A ``ValueError`` too, so a caller that caught ``ValueError`` around ``json.loads`` still
    catches it."""


def _no_constant(name: str) -> Any:
    raise NotJsonError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotJsonError(f"the number {clip(text)} is out of range")
    return value


_FINITE = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def loads(
    data: bytes | bytearray | str, what: str = "the document", *, finite: bool = False
) -> Any:
    """``data`` parsed as JSON (bytes as ``json.loads`` takes them: UTF-8, -16 or -32), or
    ``NotJsonError`` saying that ``what`` is not JSON and why, in one line."""
    try:
        if not finite:
            return json.loads(data)
        text = data if isinstance(data, str) else bytes(data).decode(json.detect_encoding(data))
        return _FINITE.decode(text)
    except NotJsonError as exc:
        raise NotJsonError(f"{what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise NotJsonError(f"{what} is not JSON: nested too deep") from exc
    except UnicodeDecodeError as exc:
        raise NotJsonError(f"{what} is not JSON: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise NotJsonError(f"{what} is not JSON: {exc.msg} at {exc.pos}") from exc
    except ValueError as exc:  # an integer literal past Python's int max str digits
        raise NotJsonError(f"{what} is not JSON: a number with too many digits to read") from exc
