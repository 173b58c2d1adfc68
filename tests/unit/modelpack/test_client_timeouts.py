"""A timeout a client sends (the ``x-timeout-ms`` header, OIP's ``parameters.timeout``) is a
positive number of at most a day, or a 400: never an exception, whatever its size (issue 18,
finding 4: ``1`` followed by 400 zeros was a 500 counted as a model error)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from modelpack.errors import InputError
from modelpack.serving import oip
from modelpack.serving.core import MAX_CLIENT_TIMEOUT_S, _oip_timeout, _timeout_header

NUMBERS = st.one_of(
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
)


@given(st.one_of(st.text(max_size=500), NUMBERS.map(str)))
def test_any_header_value_is_a_timeout_in_range_or_a_400(raw: str) -> None:
    try:
        value = _timeout_header({"x-timeout-ms": raw})
    except InputError as exc:
        assert exc.reason == "invalid"
        return
    assert value is not None and 0 < value <= MAX_CLIENT_TIMEOUT_S and math.isfinite(value)


@given(st.one_of(NUMBERS, st.text(max_size=20), st.booleans(), st.none()))
def test_any_oip_timeout_parameter_is_a_timeout_in_range_none_or_a_400(value: object) -> None:
    request = oip.OipRequest(
        {"x": np.zeros((1, 1), np.float32)}, None, False, parameters={"timeout": value}
    )
    try:
        seconds = _oip_timeout(request)
    except InputError as exc:
        assert exc.reason == "invalid"
        return
    assert seconds is None or 0 < seconds <= MAX_CLIENT_TIMEOUT_S
