"""The tensor JSON codec shared by BentoML, Lambda and MQTT. Never pickle.

A request is ``{"inputs": {"x": [[...]]}}`` or, for raw bytes,
``{"inputs": {"x": {"dtype": "float32", "shape": [1, 64], "b64": "..."}}}``.
An answer is ``{"outputs": {...}, "model": {"name", "version"}, "latency_ms": ...}``, with NaN
and infinity answered as null (JSON has no spelling for them).

One encoder writes every target's numbers: ``encode_tensor`` (and ``encode_response``) make the
documents, ``dumps`` writes them. A float32 is written with 9 significant digits and a float16
with 5, also in a document that another writer serializes (the Lambda runtime, an MQTT reply):
its floats are the 9-digit values already, so ``json.dumps`` writes no more digits than ours.
What encoding costs is bounded by the bytes it writes: a zero-size tensor costs nothing
whatever its other dims say, and its nested lists are capped (``MAX_EMPTY_LISTS``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelpack.errors import InputError, clip
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import MAX_BODY_BYTES, ServingLimits
from modelpack.serving.numbers import from_numbers
from modelpack.serving.tensors import (
    check_declared_shape,
    check_dtype,
    check_names,
    from_bytes,
)

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_EMPTY_LISTS",
    "decode_request",
    "dumps",
    "encode_response",
    "encode_tensor",
    "json_safe",
    "parse_body",
    "plain",
]


def parse_body(
    body: bytes | bytearray | str | None, limits: ServingLimits | int | None = None
) -> Any:
    """A request body as JSON, refused by size and by how many numbers it can hold before it is
    parsed into Python objects (a number costs about 40 bytes there)."""
    if limits is None:
        limits = ServingLimits()
    elif isinstance(limits, int):
        limits = ServingLimits(max_body_bytes=limits)
    if body is None or len(body) == 0:
        raise InputError('the request body is empty; send {"inputs": {...}}', reason="empty_body")
    if len(body) > limits.max_body_bytes:
        raise InputError(
            f"the request body is {len(body)} bytes; the cap is {limits.max_body_bytes}",
            reason="too_large",
        )
    raw = body.encode() if isinstance(body, str) else body
    # Every number after the first in a list follows a comma: this bounds the count from above.
    numbers = raw.count(b",") + raw.count(b"[")
    if numbers > limits.max_json_numbers:
        raise InputError(
            f"the JSON body holds up to {numbers} numbers; the cap is {limits.max_json_numbers} "
            "(send large tensors as b64 or with the binary extension)",
            reason="too_large",
        )
    try:
        # json.loads with these hooks, less the decoder it built on every call.
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    # ValueError: besides JSONDecodeError, an integer literal over Python's 4300-digit limit.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise InputError(
            f"the request body is not valid JSON: {exc}", reason="invalid_json"
        ) from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is refused: parsers differ on which one counts, so a proxy that
    checked the first would pass a body whose second is what runs."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        names = [k for k, _ in pairs]
        twice = next(k for i, k in enumerate(names) if k in names[:i])
        raise InputError(f"the JSON body gives the key {clip(repr(twice))} twice", "invalid_json")
    return doc


def _no_constant(name: str) -> Any:
    """Python's parser takes ``NaN`` and ``Infinity``; JSON has no such literals, and a proxy or
    a client library that follows the standard would refuse the body we answer."""
    raise InputError(f"{name} is not JSON (strict JSON has no NaN or infinity)", "invalid_json")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def decode_tensor(spec: TensorSpec, value: Any, limits: ServingLimits) -> np.ndarray:
    if isinstance(value, Mapping):
        return _decode_b64(spec, value, limits)
    return from_numbers(spec, value)


def _decode_b64(spec: TensorSpec, value: Mapping[str, Any], limits: ServingLimits) -> np.ndarray:
    name = spec.name
    missing = {"dtype", "shape", "b64"} - set(value)
    if missing:
        raise InputError(
            f"input {name!r}: a binary tensor needs dtype, shape and b64 (missing {', '.join(sorted(missing))})",
            reason="invalid",
        )
    dtype, text = value["dtype"], value["b64"]
    if not isinstance(dtype, str):
        raise InputError(f"input {name!r}: dtype must be a string", reason="dtype")
    itemsize = check_dtype(spec, dtype).itemsize
    dims, count = check_declared_shape(spec, value["shape"], limits)
    if count == 0 and _lists(dims) > MAX_EMPTY_LISTS:  # an answer nests its outputs alike
        raise InputError(
            f"input {name!r}: shape {list(dims)} holds no numbers, but more than "
            f"{MAX_EMPTY_LISTS} nested lists",
            reason="too_large",
        )
    if not isinstance(text, str):
        raise InputError(f"input {name!r}: b64 must be a string", reason="invalid")
    expected = count * itemsize
    if len(text) != 4 * math.ceil(expected / 3):  # checked before a byte is decoded
        raise InputError(
            f"input {name!r}: {len(text)} base64 characters cannot hold shape {list(dims)} of {dtype} ({expected} bytes)",
            reason="shape",
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"input {name!r}: b64 is not valid base64", reason="invalid") from exc
    return from_bytes(spec, dtype, list(dims), raw, limits)


def decode_request(
    payload: Any, specs: Mapping[str, TensorSpec], limits: ServingLimits | None = None
) -> dict[str, np.ndarray]:
    """``{"inputs": {...}}`` to named arrays of the model's dtypes (names checked first)."""
    limits = limits or ServingLimits()
    if not isinstance(payload, Mapping) or not isinstance(payload.get("inputs"), Mapping):
        raise InputError(
            'the request must be a JSON object {"inputs": {"NAME": tensor}}', reason="invalid"
        )
    inputs = payload["inputs"]
    check_names(specs, [str(k) for k in inputs])
    return {str(k): decode_tensor(specs[str(k)], v, limits) for k, v in inputs.items()}


def json_safe(array: Any) -> Any:
    """NaN and infinity have no JSON spelling: they are answered as null."""
    array = np.asarray(array)
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array
    return np.where(np.isfinite(array), array, None)


# Enough significant digits to name every float of the width exactly (its max_digits10), written
# by C's printf instead of the shortest repr of the float64 that tolist() makes (17 digits): three
# times faster for a float32 output, and a third shorter. '#' keeps the point: 1.0 stays a float
# in a client's parser, not the integer 1. When the integer part fills every digit (1e8 as
# float32, 65504 as float16) printf ends the number with a bare point, which JSON does not allow:
# ``_whole`` gives it a zero.
_DIGITS = {"float16": "%#.5g", "float32": "%#.9g"}
# By dtype, once per output: a dtype's name is a slow property (the name serves other byte orders).
_FORMS = {np.dtype(name): form for name, form in _DIGITS.items()}
# Templates are cached for small outputs, where building one costs as much as writing it; a big
# one takes 3 % of its writing to build, and 128 cached ones of 65536 numbers would hold 50 MB.
_CACHED_TEMPLATE_ELEMENTS = 1 << 12
# A zero-size tensor holds no numbers, but its nested lists are real text: [1, 10**8, 0] would
# be 10**8 empty lists. Past this many the answer is refused (413), whatever the request's size.
MAX_EMPTY_LISTS = 1 << 12
# Where dumps splices Numbers in: a secret of this process, so no string a client sends (an OIP
# id) can pose as one. It never leaves the process: every mark is replaced.
_MARK = os.urandom(12).hex()


class Numbers:
    """An array's JSON text, written already; ``dumps`` splices it in. Only in documents that go
    straight to ``dumps`` (an answer's body), never in ones callers read."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def numbers(array: np.ndarray) -> Any:
    """``array.tolist()`` for a body: a float32 or float16 array as ``Numbers`` (NaN and
    infinity as null), anything else as lists with NaN and infinity as null."""
    array = np.asarray(array)
    form = _form(array.dtype)
    if array.size == 0:
        return Numbers(_empty(array.shape))
    if form is None:
        return json_safe(array).tolist()
    return Numbers(_written(array, form))


def plain(array: np.ndarray) -> Any:
    """``array.tolist()`` for a document that another writer serializes (the Lambda runtime,
    ``json.dumps``): float32 and float16 values are the ones ``numbers`` writes, so no writer
    spells them with float64's 17 digits; NaN and infinity are None."""
    array = np.asarray(array)
    form = _form(array.dtype)
    if array.size == 0:
        return json.loads(_empty(array.shape))
    if form is None:
        return json_safe(array).tolist()
    return json.loads(_written(array, form))


def _form(dtype: np.dtype[Any]) -> str | None:
    form = _FORMS.get(dtype)
    return _DIGITS.get(dtype.name) if form is None and dtype.kind == "f" else form


def _written(array: np.ndarray, form: str) -> str:
    text = _template(array.shape, form, array.size) % tuple(array.reshape(-1).tolist())
    # printf spells NaN and infinity nan, inf and -inf; a finite number in this form never has
    # an "n" (digits, point, sign, e), nor has the template: one search in C, no numpy pass.
    if "n" in text:
        text = text.replace("nan", "null").replace("-inf", "null").replace("inf", "null")
    return _whole(text)


def _whole(text: str) -> str:
    # A bare point can only stand before the comma or bracket that ends a number, or at the end
    # of a 0-d array's one number.
    text = text.replace(".,", ".0,").replace(".]", ".0]")
    return text + "0" if text.endswith(".") else text


def _lists(shape: Sequence[int]) -> int:
    """How many lists a zero-size array of ``shape`` nests (counted only up to past the cap):
    its dims before the first zero. The dims after it cost nothing."""
    lists = rows = 1
    for dim in shape[: list(shape).index(0)]:
        rows *= dim
        lists += rows
        if lists > MAX_EMPTY_LISTS:
            break
    return lists


def _empty(shape: tuple[int, ...]) -> str:
    """The nested lists of a zero-size array (the float writer once built a template for every
    element its shape would hold without its zero: gigabytes for 78 bytes of request)."""
    if _lists(shape) > MAX_EMPTY_LISTS:
        raise InputError(
            f"an output of shape {list(shape)} holds no numbers, but more than "
            f"{MAX_EMPTY_LISTS} nested lists; ask for it in binary (b64 or OIP)",
            reason="too_large",
        )
    text = "[]"
    for dim in reversed(shape[: shape.index(0)]):
        text = "[" + ",".join([text] * dim) + "]"
    return text


def _template(shape: tuple[int, ...], form: str, size: int) -> str:
    if size <= _CACHED_TEMPLATE_ELEMENTS:
        return _cached_template(shape, form)
    return _nest(shape, form)


@functools.lru_cache(maxsize=128)
def _cached_template(shape: tuple[int, ...], form: str) -> str:
    return _nest(shape, form)


def _nest(shape: tuple[int, ...], form: str) -> str:
    if not shape:
        return form
    return "[" + ",".join([_nest(shape[1:], form)] * shape[0]) + "]"


def encode_tensor(array: np.ndarray, binary: bool = False, body: bool = False) -> Any:
    """A tensor for tensor JSON: nested lists, or with ``binary`` a b64 object; ``body``: for a
    document that goes straight to ``dumps`` (see ``numbers``)."""
    array = np.asarray(array)
    if binary:
        contiguous = np.require(array, requirements="C")  # keeps a 0-d array 0-d
        return {
            "dtype": str(contiguous.dtype),
            "shape": list(contiguous.shape),
            "b64": base64.b64encode(contiguous.tobytes()).decode("ascii"),
        }
    return numbers(array) if body else plain(array)


def encode_response(
    outputs: Mapping[str, np.ndarray],
    model: Mapping[str, Any],
    latency_ms: float,
    binary: bool = False,
    body: bool = False,
) -> dict[str, Any]:
    return {
        "outputs": {k: encode_tensor(v, binary, body) for k, v in outputs.items()},
        "model": dict(model),
        "latency_ms": round(latency_ms, 3),
    }


def dumps(doc: Any) -> bytes:
    """Compact JSON, with the text of any ``Numbers`` in ``doc`` spliced in."""
    texts: list[str] = []

    def splice(value: Any) -> str:
        if not isinstance(value, Numbers):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        texts.append(value.text)
        return f"\0{_MARK}{len(texts) - 1}\0"

    text = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=splice)
    for i, numbers_text in enumerate(texts):
        text = text.replace(f'"\\u0000{_MARK}{i}\\u0000"', numbers_text, 1)
    return text.encode()
