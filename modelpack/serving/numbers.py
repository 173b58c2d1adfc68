"""JSON numbers as the model's dtypes, only where no number changes.

Python parses a JSON integer exactly and a fraction to the nearest float64; numpy reads a list
of them as float64 whenever one is a fraction or past int64, which rounds integers past 2**53
(2**64-1 became 2**64, then 0 in uint64). So an integer must be exactly a value of the dtype,
checked on the integer Python parsed; a fraction is rounded to the dtype's nearest value as any
decimal is, but never to infinity and never from nonzero to zero. NaN and infinity are refused:
strict JSON has no literal for them (a Lambda direct invocation's parser may let them through).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from modelpack.errors import InputError
from modelpack.manifest import TensorSpec


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
    kind, target = array.dtype.kind, _dtype(spec.dtype)
    fast = _exact_at_once(array, target) if kind in "iuf" else None
    if fast is not None:
        return fast
    if kind == "O":  # integers past uint64 or int64, or things that are not numbers
        return _objects(spec.name, array, target)
    if kind not in "biuf":
        raise InputError(
            f"input {spec.name!r}: expected numbers, got {_kind_name(array)}", reason="dtype"
        )
    if kind == "f":
        # numpy made floats of every number: an integer past what a float holds exactly was
        # rounded (2**64-1 became 2**64), so those are read again as Python parsed them.
        return _big_ints_again(spec.name, array, lambda i: _at(value, i, array.shape), target)
    return coerce(spec.name, array, spec.dtype)


@functools.lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)  # a TypeError for a name numpy does not know, as before


@functools.lru_cache(maxsize=64)
def _ints_within(dtype: np.dtype[Any]) -> tuple[float, float]:
    """The open interval whose numbers all convert to ``dtype`` with nothing lost but a
    fraction's rounding: for a float, the integers it holds exactly (so no integer numpy read
    as a float64 past 2**53 is in it, and no value overflows); for an integer, its range."""
    if dtype.kind == "f":
        limit = float(_exact_ints(dtype))
        return -limit, limit
    info = np.iinfo(dtype)
    # As floats (how numpy compares an int64 with them), rounded the way every value is: a
    # value above max rounds to at least float(max + 1), so it never passes.
    return float(int(info.min) - 1), float(int(info.max) + 1)


def _exact_at_once(array: np.ndarray, target: np.dtype[Any]) -> np.ndarray | None:
    """The usual request (a few finite numbers, well within the dtype) converted with one
    vectorized look at its extremes, or None: then the exact path below looks at every value
    (integers past 2**53, values near or past the dtype's range, NaN, a fraction for an
    integer dtype, a float64 that would vanish in a smaller float)."""
    usual = target.kind == "f" or (target.kind in "iu" and array.dtype.kind in "iu")
    if not array.size or not usual:
        return None
    low, high = _ints_within(target)
    # min and max carry NaN through, and NaN is within nothing: the exact path refuses it.
    if not (low < array.min() and array.max() < high):
        return None
    if array.dtype == target:
        return array
    converted = array.astype(target)
    # Every nonzero value must stay nonzero in a smaller float (1e-50 is 0 as a float32).
    smaller = array.dtype.kind == "f" and target.itemsize < array.dtype.itemsize
    if smaller and np.count_nonzero(converted) != np.count_nonzero(array):
        return None
    return converted


def _at(nested: Any, flat_index: int, shape: tuple[int, ...]) -> Any:
    for i in np.unravel_index(flat_index, shape):
        nested = nested[int(i)]
    return nested


def _objects(name: str, array: np.ndarray, target: np.dtype[Any]) -> np.ndarray:
    flat = array.reshape(-1).tolist()
    if not set(map(type, flat)) <= {int, float, bool}:
        raise InputError(
            f"input {name!r}: expected numbers, got a mix of values (null, objects or strings)",
            reason="dtype",
        )
    try:
        floats = np.array(flat, dtype=np.float64).reshape(array.shape)
    except OverflowError as exc:  # an integer past float64's range: no dtype holds it
        raise InputError(
            f"input {name!r}: an integer past float64's range is not exactly a {target.name}",
            "dtype",
        ) from exc
    return _big_ints_again(name, floats, flat.__getitem__, target)


def _big_ints_again(
    name: str, floats: np.ndarray, parsed: Callable[[int], Any], target: np.dtype[Any]
) -> np.ndarray:
    """``floats``, numpy's float64 reading of the numbers, as ``target``; where it may have
    rounded an integer (past what the dtype holds exactly), the integer Python parsed
    (``parsed(flat index)``) is converted exactly or refused. Only those are looked at one by
    one: a million numbers with one such integer at the end cost what a million floats do."""
    suspects = np.flatnonzero(np.abs(floats) >= _exact_ints(target)).tolist()  # not NaN
    big = [i for i in suspects if type(parsed(i)) is int]
    if not big:
        return coerce(name, floats, target.name)
    exact = _exact_big_ints(name, [parsed(i) for i in big], target)
    flat = floats.flatten()  # a copy: the array numpy read stays as it was
    flat[big] = 0
    out = coerce(name, flat, target.name)
    out[big] = exact
    return out.reshape(floats.shape)


def _exact_big_ints(name: str, values: list[int], target: np.dtype[Any]) -> np.ndarray:
    if target.kind in "iu":
        try:
            return np.array(values, dtype=target)  # exact, or OverflowError
        except OverflowError:
            info = np.iinfo(target)
            bad = next(v for v in values if not info.min <= v <= info.max)
            raise _lossy(name, bad, target) from None
    for value in values:  # a float dtype (or bool): exactly its value, or refused
        _int_in_float(name, value, target)
    return np.array(values, dtype=np.float64).astype(target)


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


def _int_in_float(name: str, value: int, target: np.dtype[Any]) -> None:
    """An integer past what a float64 holds exactly must be exactly a value of ``target``."""
    try:
        with np.errstate(over="ignore"):
            converted = target.type(value) if target.kind == "f" else None
    except OverflowError:  # past float64
        converted = None
    # int() of a finite float is exact; numpy would compare the integer as a float instead.
    if converted is None or not np.isfinite(converted) or int(converted) != value:
        raise _lossy(name, value, target)


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
    target = _dtype(dtype)
    if array.dtype == target:
        return array
    kind = array.dtype.kind
    fast = _exact_at_once(array, target) if kind in "iuf" else None
    if fast is not None:
        return fast
    if kind not in "biuf":
        raise InputError(f"input {name!r}: expected {dtype}, got {array.dtype}", reason="dtype")
    if target.kind == "b":
        # An empty list is read as float64: it holds no value that could change.
        if not array.size or (kind in "biu" and np.isin(array, (0, 1)).all()):
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
                _int_in_float(name, value, target)
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
