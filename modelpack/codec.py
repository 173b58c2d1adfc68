"""The tensor JSON codec shared by BentoML, Lambda and MQTT. Never pickle.

A request is ``{"inputs": {"x": [[...]]}}`` or, for raw bytes,
``{"inputs": {"x": {"dtype": "float32", "shape": [1, 64], "b64": "..."}}}``.
An answer is ``{"outputs": {...}, "model": {"name", "version"}, "latency_ms": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelpack.errors import InputError
from modelpack.manifest import DTYPES

MAX_BODY_BYTES = 64 << 20


def parse_body(body: bytes | str | None, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """Parse a request body as JSON, with a size cap and one-line reasons."""
    if body is None or len(body) == 0:
        raise InputError('the request body is empty; send {"inputs": {...}}', reason="empty_body")
    if len(body) > max_bytes:
        raise InputError(
            f"the request body is {len(body)} bytes; the cap is {max_bytes}", reason="too_large"
        )
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting
        raise InputError(
            f"the request body is not valid JSON: {exc}", reason="invalid_json"
        ) from exc


def decode_tensor(name: str, value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        return _decode_b64(name, value)
    if isinstance(value, str):
        raise InputError(f"input {name!r}: expected numbers, got a string", reason="dtype")
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputError(
            f"input {name!r}: nested lists of unequal lengths", reason="shape"
        ) from exc
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"input {name!r}: expected numbers, got {_kind_name(array)}", reason="dtype"
        )
    return array


def _kind_name(array: np.ndarray) -> str:
    if array.dtype.kind in "US":
        return "strings"
    if array.dtype.kind == "O":
        return "a mix of values (null, objects or strings)"
    return str(array.dtype)


def _decode_b64(name: str, value: Mapping[str, Any]) -> np.ndarray:
    missing = {"dtype", "shape", "b64"} - set(value)
    if missing:
        raise InputError(
            f"input {name!r}: a binary tensor needs dtype, shape and b64 (missing {', '.join(sorted(missing))})",
            reason="invalid",
        )
    dtype, shape = value["dtype"], value["shape"]
    if dtype not in DTYPES or dtype == "string":
        raise InputError(f"input {name!r}: unknown dtype {dtype!r}", reason="dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(
            f"input {name!r}: shape must be a list of non-negative integers", reason="shape"
        )
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise InputError(f"input {name!r}: b64 is not valid base64", reason="invalid") from exc
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise InputError(
            f"input {name!r}: {len(raw)} bytes do not fill shape {shape} of {dtype} ({expected} bytes)",
            reason="shape",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_request(payload: Any) -> dict[str, np.ndarray]:
    """``{"inputs": {...}}`` to named arrays (dtypes are checked later against the model)."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("inputs"), Mapping):
        raise InputError(
            'the request must be a JSON object {"inputs": {"NAME": tensor}}', reason="invalid"
        )
    return {str(k): decode_tensor(str(k), v) for k, v in payload["inputs"].items()}


def encode_tensor(array: np.ndarray, binary: bool = False) -> Any:
    array = np.asarray(array)
    if binary:
        contiguous = np.ascontiguousarray(array)
        return {
            "dtype": str(contiguous.dtype),
            "shape": list(contiguous.shape),
            "b64": base64.b64encode(contiguous.tobytes()).decode("ascii"),
        }
    return array.tolist()


def encode_response(
    outputs: Mapping[str, np.ndarray],
    model: Mapping[str, Any],
    latency_ms: float,
    binary: bool = False,
) -> dict[str, Any]:
    return {
        "outputs": {k: encode_tensor(v, binary) for k, v in outputs.items()},
        "model": dict(model),
        "latency_ms": round(latency_ms, 3),
    }


def error_body(exc: Exception) -> dict[str, Any]:
    """The JSON every target answers a refused request with."""
    reason = getattr(exc, "reason", "error")
    return {"error": str(exc), "reason": reason}
