"""The usual request's numbers are converted with one look at their extremes
(``numbers._exact_at_once``); every value near or past a dtype's edges goes the exact way. The
fast way must decide exactly as the exact one does: same array, same dtype, or the same refusal,
for every integer and float dtype, at the boundaries issue 18 names (2**53±1, 2**63±1, 2**64-1,
float32's max and smallest subnormal) and around them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.errors import InputError
from modelpack.manifest import TensorSpec
from modelpack.serving import numbers

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64"]
DTYPES += ["uint8", "uint16", "uint32", "uint64"]
F32 = np.finfo(np.float32)
EDGES: list[Any] = [0, 1, -1, 2**11, 2**24, 2**53, 2**63, 2**64 - 1, 2**64, 2**31, 2**15, 255]
EDGES += [float(F32.max), float(F32.smallest_subnormal), 65504.0, 1e-50, 1e39, 1e308]


def _near(value: Any) -> list[Any]:
    around = [value + d for d in (-1, 0, 1)] if isinstance(value, int) else [value]
    return around + [-v for v in around]


NUMBER = st.one_of(
    st.sampled_from([v for e in EDGES for v in _near(e)]),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-1000, 1000),
    st.integers(-300, 300),
)


def _outcome(spec: TensorSpec, value: Any) -> tuple[str, Any]:
    try:
        array = numbers.from_numbers(spec, value)
    except InputError as exc:
        return "refused", (exc.reason, str(exc))
    return array.dtype.name, array.tolist()


@settings(max_examples=600, deadline=None)
@given(dtype=st.sampled_from(DTYPES), values=st.lists(NUMBER, min_size=1, max_size=6))
def test_the_fast_way_decides_as_the_exact_way(dtype: str, values: list[Any]) -> None:
    spec = TensorSpec(name="x", dtype=dtype, shape=[None])
    fast = _outcome(spec, values)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numbers, "_exact_at_once", lambda array, target: None)
        exact = _outcome(spec, values)
    assert fast == exact
    # and a caller's array (the predictor's coerce) alike
    array = np.asarray(values) if fast[0] != "refused" else None
    if array is not None and array.dtype.kind in "iuf":
        converted = numbers.coerce("x", array, dtype)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numbers, "_exact_at_once", lambda array, target: None)
            assert converted.tolist() == numbers.coerce("x", array, dtype).tolist()


def test_the_usual_request_takes_the_fast_way(monkeypatch: pytest.MonkeyPatch) -> None:
    row = np.random.default_rng(0).random((1, 64)).round(4).tolist()
    taken: list[bool] = []
    original = numbers._exact_at_once

    def spy(array: np.ndarray, target: np.dtype[Any]) -> np.ndarray | None:
        out = original(array, target)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(numbers, "_exact_at_once", spy)
    out = numbers.from_numbers(TensorSpec(name="x", dtype="float32", shape=[None, 64]), row)
    assert out.dtype == np.float32 and taken == [True]
    # a value float32 turns to 0 is not taken the fast way, and refused by the exact one
    with pytest.raises(InputError, match="too small"):
        numbers.from_numbers(TensorSpec(name="x", dtype="float32", shape=[None]), [1.0, 1e-50])
    assert taken[-1] is False
