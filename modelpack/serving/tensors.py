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

from modelpack.errors import InputError
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import ServingLimits

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
    text = repr(name)
    return text if len(text) <= cap else f"{text[:cap]}...({len(name)} characters)"


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
    # other dims would describe more bytes than an index reaches (ValueError: it was a 500).
    nominal = math.prod(d for d in shape if d) * _itemsize(spec.dtype)
    if nominal > np.iinfo(np.intp).max:
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
            f"input {spec.name!r}: the model takes {spec.dtype}, got {dtype}", reason="dtype"
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


def from_numbers(spec: TensorSpec, value: Any) -> np.ndarray:
    """Nested JSON lists of numbers as the model's dtype, only where no number changes: an
    integer must fit the dtype exactly (2**64-1 in uint64, 2**53+1 in no float), a fraction is
    rounded to the dtype's nearest as every decimal is, but never to infinity, nor from nonzero
    to zero. Anything else is a 400 that names the input."""
    if isinstance(value, str):
        raise InputError(f"input {spec.name!r}: expected numbers, got a string", reason="dtype")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError) as exc:  # ragged or absurdly deep lists
        raise InputError(
            f"input {spec.name!r}: nested lists of unequal lengths", reason="shape"
        ) from exc
    kind, target = array.dtype.kind, np.dtype(spec.dtype)
    if kind == "f" and array.size and not np.abs(array).max() < _exact_ints(target):
        # numpy made floats of every number: an integer past what a float holds was rounded
        # (2**64-1 became 2**64), so the numbers are read again as Python gives them.
        kind = "O"
    if kind == "O":
        return _exactly(spec.name, np.asarray(value, dtype=object), target)
    if kind not in "biuf":
        raise InputError(
            f"input {spec.name!r}: expected numbers, got {_kind_name(array)}", reason="dtype"
        )
    return coerce(spec.name, array, spec.dtype)


def _exact_ints(dtype: np.dtype[Any]) -> int:
    """The largest magnitude up to which every integer is a value of ``dtype``."""
    if dtype.kind == "f":
        return 2 ** (np.finfo(dtype).nmant + 1)
    return 2**53  # what float64, numpy's reading of a mixed list, holds exactly


def _kind_name(array: np.ndarray) -> str:
    if array.dtype.kind in "US":
        return "strings"
    if array.dtype.kind == "O":
        return "a mix of values (null, objects or strings)"
    return str(array.dtype)


def _exactly(name: str, objects: np.ndarray, target: np.dtype[Any]) -> np.ndarray:
    """The slow, exact path: each number as Python parsed it (a bounded count: the body's
    number cap), checked one by one."""
    values = [_scalar(name, v, target) for v in objects.reshape(-1).tolist()]
    return np.array(values, dtype=target).reshape(objects.shape)


def _scalar(name: str, value: Any, target: np.dtype[Any]) -> Any:
    if not isinstance(value, int | float):
        raise InputError(
            f"input {name!r}: expected numbers, got a mix of values (null, objects or strings)",
            reason="dtype",
        )
    if isinstance(value, bool) or target.kind == "b":
        return coerce(name, np.asarray(value), target.name).item()
    if target.kind in "iu":
        whole = isinstance(value, int) or (math.isfinite(value) and value.is_integer())
        info = np.iinfo(target)
        if not (whole and info.min <= value <= info.max):
            raise _lossy(name, value, target)
        return int(value)
    try:
        with np.errstate(over="ignore", under="ignore"):
            converted = target.type(value)
    except OverflowError:  # an integer past float64
        raise _lossy(name, value, target) from None
    if not (math.isfinite(value) and np.isfinite(converted)):
        raise _lossy(name, value, target)
    # int() of a finite float is exact; numpy would compare the integer as a float instead.
    if int(converted) != value if isinstance(value, int) else value != 0 and converted == 0:
        raise _lossy(name, value, target)
    return converted


def _lossy(name: str, value: Any, target: np.dtype[Any]) -> InputError:
    shown = (
        str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}...({len(str(value))} digits)"
    )
    if isinstance(value, float) and not math.isfinite(value):
        why = "NaN or infinity (a number past float64 reads as infinity)"
    elif target.kind in "iu":
        why = f"expected integers within {target.name}, got {shown}"
    elif isinstance(value, int):
        why = f"the integer {shown} is not exactly a {target.name}"
    elif abs(value) < 1:
        why = f"{shown} is too small for {target.name} (it would become 0)"
    else:
        why = f"{shown} is past the range of {target.name} (it would become infinity)"
    return InputError(f"input {name!r}: {why}", reason="dtype")


def coerce(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """An array (a JSON list numpy read, or a caller's array) as the model's dtype, refused when
    a value would change beyond rounding a fraction (see ``from_numbers``)."""
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    kind = array.dtype.kind
    if kind not in "biuf":
        raise InputError(f"input {name!r}: expected {dtype}, got {array.dtype}", reason="dtype")
    if target.kind == "b":
        if kind in "biu" and np.isin(array, (0, 1)).all():
            return array.astype(bool)
        raise InputError(f"input {name!r}: expected {dtype} (0 or 1), got {array.dtype}", "dtype")
    if not array.size or kind == "b":
        return array.astype(target)
    if kind == "f" and not np.isfinite(array).all():
        raise _lossy(name, _first(array, ~np.isfinite(array)), target)
    if target.kind == "f":
        return _to_float(name, array, target)
    if kind == "f":
        fraction = array != np.floor(array)
        if fraction.any():
            raise _lossy(name, _first(array, fraction), target)
    info = np.iinfo(target)
    # Python integers and, for floats, the exact power of two past the top: float(2**64-1) is
    # 2**64, so comparing floats with info.max would pass 2**64 (which astype wraps to 0).
    low, high = (float(info.min), float(info.max + 1)) if kind == "f" else (info.min, info.max + 1)
    outside = (array < low) | (array >= high)
    if outside.any():
        raise _lossy(name, _first(array, outside), target)
    return array.astype(target)


def _to_float(name: str, array: np.ndarray, target: np.dtype[Any]) -> np.ndarray:
    if array.dtype.kind in "iu":
        limit = _exact_ints(target)
        big = (array > limit) | (array < -limit)
        if big.any():  # integers past the limit: each checked exactly
            for value in array[big].tolist():
                _scalar(name, value, target)
    with np.errstate(over="ignore", under="ignore"):
        converted = array.astype(target)
    if not np.isfinite(converted).all():
        raise _lossy(name, _first(array, ~np.isfinite(converted)), target)
    if array.dtype.kind == "f" and target.itemsize < array.dtype.itemsize:
        vanished = (converted == 0) & (array != 0)
        if vanished.any():
            raise _lossy(name, _first(array, vanished), target)
    return converted


def _first(array: np.ndarray, mask: np.ndarray) -> Any:
    return array[mask].reshape(-1)[0].item()


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
