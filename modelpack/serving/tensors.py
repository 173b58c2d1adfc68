"""Tensors checked against the io signature before anything is allocated or run.

A declared shape (b64, the binary extension, OIP's ``shape``) is checked for sign, overflow and
caps with Python integers, and against the byte count it claims, before a byte is decoded.
Within one request every batch-major input (its first dim is symbolic in the signature) carries
the same number of rows, whatever its symbol is called: tf2onnx names every batch dim
differently (``unk__1``, ``unk__2``), so distinct names are not trusted to mean distinct sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelpack.errors import InputError, clip
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import ServingLimits
from modelpack.serving.numbers import coerce as coerce  # callers' arrays (the predictor)

_MAX_INTP = int(np.iinfo(np.intp).max)
MAX_RANK = 64  # numpy 2 limit on dims (a model of unknown rank does not bound it)
NUMERIC_DTYPES = frozenset(
    (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
)


def fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "[any rank]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def shown(name: str, cap: int = 64) -> str:
    """A client's name for a message: its repr (which escapes control characters and lone
    surrogates), cut short, so a refusal is never larger than one line."""
    return clip(repr(name), cap)


def check_names(specs: Mapping[str, TensorSpec], names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise InputError(
            f"unknown input {shown(unknown[0])}; the model takes {', '.join(specs)}",
            reason="unknown_input",
        )
    missing = [n for n in specs if n not in names]
    if missing:
        raise InputError(f"missing input {missing[0]!r}", reason="missing_input")
    if len(set(names)) != len(names):
        raise InputError("an input is given twice", reason="invalid")


def check_declared_shape(
    spec: TensorSpec, shape: Any, limits: ServingLimits
) -> tuple[tuple[int, ...], int]:
    """A client's declared shape, checked before allocation; returns it and its element count."""
    name = spec.name
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InputError(f"input {name!r}: shape must be a list of integers", reason="shape")
    if len(shape) > MAX_RANK:  # numpy's own limit: reshape would raise ValueError
        raise InputError(f"input {name!r}: rank {len(shape)} is over {MAX_RANK}", reason="shape")
    if any(d < 0 for d in shape):
        raise InputError(f"input {name!r}: shape {list(shape)} has a negative dim", reason="shape")
    count = math.prod(shape)  # Python ints: no wrap-around, whatever the client sends
    if count > limits.max_elements:
        raise InputError(
            f"input {name!r}: shape {list(shape)} is {count} elements; the cap is {limits.max_elements}",
            reason="too_large",
        )
    # A zero-size shape holds nothing whatever its other dims, but numpy still refuses one whose
    # other dims would describe more bytes than an index reaches (ValueError: it was a 500). A
    # shape that holds numbers describes count * itemsize bytes: only past 2**57 elements (of
    # up to 64 bytes each) can that be past it.
    may_overflow = count == 0 or count > _MAX_INTP >> 6
    if may_overflow and math.prod(d for d in shape if d) * _itemsize(spec.dtype) > _MAX_INTP:
        raise InputError(
            f"input {name!r}: shape {list(shape)} is past what an array can describe",
            reason="too_large",
        )
    check_shape(spec, tuple(shape))
    return tuple(shape), count


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a dtype numpy does not know is refused with the client's dtype
        return 1


def check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    """Rank and fixed dims against the signature."""
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {spec.name!r}: expected rank {len(spec.shape)} {fmt_shape(spec.shape)}, got shape {list(shape)}",
            reason="shape",
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise InputError(
                f"input {spec.name!r}: dim {axis} must be {want} {fmt_shape(spec.shape)}, got {got}",
                reason="shape",
            )


def check_dtype(spec: TensorSpec, dtype: str) -> np.dtype[Any]:
    """Raw tensors (b64, binary) must be exactly the dtype the model declares."""
    if dtype != spec.dtype:
        raise InputError(
            f"input {spec.name!r}: the model takes {spec.dtype}, got {shown(dtype)}", reason="dtype"
        )
    return np.dtype(dtype)


def from_bytes(
    spec: TensorSpec, dtype: str, shape: Any, raw: bytes | memoryview, limits: ServingLimits
) -> np.ndarray:
    """A raw tensor: exactly shape x itemsize bytes of the declared dtype, no copy."""
    np_dtype = check_dtype(spec, dtype)
    dims, count = check_declared_shape(spec, shape, limits)
    expected = count * np_dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            f"input {spec.name!r}: {len(raw)} bytes do not fill shape {list(dims)} of {dtype} ({expected} bytes)",
            reason="shape",
        )
    array = np.frombuffer(raw, dtype=np_dtype).reshape(dims)
    if np_dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise InputError(f"input {spec.name!r}: bool bytes must be 0 or 1", reason="dtype")
    return array


def check_feed(
    specs: Mapping[str, TensorSpec], feed: Mapping[str, np.ndarray], limits: ServingLimits
) -> int:
    """The whole request: names, shapes, symbols, rows and bytes. Returns its row count (1 for
    a model without batch-major inputs)."""
    check_names(specs, list(feed))
    symbols: dict[str, int] = {}
    rows: dict[str, int] = {}
    total = 0
    for name, spec in specs.items():
        array = feed[name]
        check_shape(spec, array.shape)
        if array.size > limits.max_elements:
            raise InputError(
                f"input {name!r} is {array.size} elements; the cap is {limits.max_elements}",
                reason="too_large",
            )
        for axis, want in enumerate(spec.shape or []):
            if isinstance(want, str) and want.strip("?"):  # "?" names no symbol
                seen = symbols.setdefault(want, array.shape[axis])
                if seen != array.shape[axis]:
                    raise InputError(
                        f"input {name!r}: dim {axis} ({want}) is {array.shape[axis]} but {seen} in another input",
                        reason="shape",
                    )
        if spec.batch_dynamic:
            rows[name] = int(array.shape[0])
        total += array.nbytes
    if total > limits.max_input_bytes:
        raise InputError(
            f"inputs are {total} bytes; the cap is {limits.max_input_bytes}", reason="too_large"
        )
    return _rows(rows, limits)


class FeedChecks:
    """``check_feed`` for one model's inputs, remembered per feed pattern: its inputs' names,
    shapes and dtypes, in order. The outcome depends on nothing else (and the limits, which
    are the same object request after request), and a busy server sees the same few patterns:
    the whole check cost 3-5 µs a request, the look-up costs a tenth. Only passes are kept,
    at most ``keep`` patterns (a client picks its shapes: when full, the memory starts over)."""

    __slots__ = ("_limits", "_passed", "keep", "specs")

    def __init__(self, specs: Mapping[str, TensorSpec], keep: int = 64) -> None:
        self.specs, self.keep = specs, keep
        self._limits: ServingLimits | None = None
        self._passed: dict[tuple[tuple[str, tuple[int, ...], np.dtype[Any]], ...], int] = {}

    def rows(self, feed: Mapping[str, np.ndarray], limits: ServingLimits) -> int:
        """``check_feed(specs, feed, limits)``: its row count, or its InputError."""
        key = tuple([(name, array.shape, array.dtype) for name, array in feed.items()])
        if limits is self._limits:
            rows = self._passed.get(key)
            if rows is not None:
                return rows
        rows = check_feed(self.specs, feed, limits)
        if limits is not self._limits or len(self._passed) >= self.keep:
            self._limits, self._passed = limits, {}
        self._passed[key] = rows
        return rows


def _rows(rows: Mapping[str, int], limits: ServingLimits) -> int:
    if not rows:
        return 1
    counts = set(rows.values())
    if len(counts) > 1:
        listed = ", ".join(f"{n}: {r}" for n, r in rows.items())
        raise InputError(
            f"every batch-major input must carry the same number of rows ({listed})",
            reason="rows",
        )
    (count,) = counts
    if count == 0:
        raise InputError("the request has no rows (the batch dim is 0)", reason="rows")
    if count > limits.max_rows:
        raise InputError(
            f"a batch of {count} rows is over the cap of {limits.max_rows}",
            reason="batch_too_large",
        )
    return count
