"""The codec's bounds (issue 18): what a request costs is bounded by its bytes and the answer's
real elements, never by a shape's nominal size; numbers become the model's dtype only when none
changes; every parameter a client sends is checked with a range; a compressed body is exactly
one gzip member or zlib stream."""

from __future__ import annotations

import base64
import gzip
import json
import math
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack import InputError, decode_request, encode_response, parse_body
from modelpack.codec import MAX_EMPTY_LISTS, dumps
from modelpack.manifest import TensorSpec
from modelpack.serving import oip
from modelpack.serving.limits import ServingLimits
from modelpack.serving.routes import decoded

DTYPES = list(oip.DATATYPES.values())
LIMITS = ServingLimits()


# --- the cost of encoding and decoding ------------------------------------------------------


def _peak(work: Callable[[], Any]) -> int:
    """The most memory ``work`` held at once, in bytes (Python's allocations, numpy's too)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _round_trip(array: np.ndarray) -> int:
    """A b64 request for ``array`` through decoding, then the answer of it written in every
    form the targets use; returns the request's size in bytes."""
    spec = TensorSpec(name="x", dtype=str(array.dtype), shape=[None] * array.ndim)
    raw = base64.b64encode(array.tobytes()).decode()
    tensor = {"dtype": str(array.dtype), "shape": list(array.shape), "b64": raw}
    body = json.dumps({"inputs": {"x": tensor}}).encode()

    def work() -> None:
        feed = decode_request(parse_body(body), {"x": spec}, LIMITS)
        out = {"y": feed["x"]}
        dumps(encode_response(out, {"name": "m", "version": 1}, 1.0, body=True))
        json.dumps(encode_response(out, {"name": "m", "version": 1}, 1.0))
        request = oip.OipRequest(feed, None, False)
        dumps(oip.answer_doc(request, out, "m", "1", body=True)[0])
        dumps(oip.answer_doc(request, out, "m", "1")[0])
        dumps(encode_response(out, {"name": "m", "version": 1}, 1.0, binary=True))

    work()  # templates and caches warm: what is measured is one more request
    used = _peak(work)
    # Per real element: a Python number, its text a few times over and its list slot; per
    # request byte: the body, its parse and its decoded bytes; and a constant (the nested
    # lists of a zero-size answer are capped at MAX_EMPTY_LISTS).
    bound = (
        (64 << 10)
        + 400 * array.size
        + 16 * len(body)
        + 128 * min(MAX_EMPTY_LISTS, _lists(array.shape))
    )
    assert used <= bound, (array.shape, array.dtype, used, bound)
    return len(body)


def _lists(shape: tuple[int, ...]) -> int:
    count = rows = 1
    for dim in shape[: shape.index(0)] if 0 in shape else shape[:-1]:
        rows *= dim
        count += rows
    return count


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    """Any dtype; shapes with zeros in them (then the other dims may be anything: they hold
    nothing) or without (then a few thousand elements at most)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rank = draw(st.integers(1, 5))
    if draw(st.booleans()):
        dims = draw(st.lists(st.integers(0, 2**40), min_size=rank, max_size=rank))
        zero = draw(st.integers(0, rank - 1))
        dims[zero] = 0
        for i in range(zero):  # nested lists within the cap (past it: the tests below)
            dims[i] = draw(st.integers(1, 4))
        while math.prod(d for d in dims if d) * dtype.itemsize >= 2**63:  # numpy's own limit
            dims[dims.index(max(dims))] //= 2**20
        return np.zeros(dims, dtype)
    dims = draw(st.lists(st.integers(1, 8), min_size=rank, max_size=rank))
    if math.prod(dims) > 4096:
        dims = [*dims[:-1], 1]
    values = draw(st.integers(0, 2**32))
    rng = np.random.default_rng(values)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, dims, dtype=dtype, endpoint=True)


@settings(max_examples=150, deadline=None)
@given(_arrays())
def test_encoding_and_decoding_cost_what_the_elements_and_the_request_hold(
    array: np.ndarray,
) -> None:
    _round_trip(array)


@pytest.mark.parametrize("shape", [[1, 0, 100_000_000], [1, 0, 2**40], [0, 2**60], [2**40, 0]])
def test_a_zero_size_tensor_of_any_shape_costs_nothing(shape: list[int]) -> None:
    """78 bytes of request once built the text template of 10**8 numbers (1.5 GB); 2**40 was a
    500. The dims after the first zero cost nothing, wherever the zero is."""
    if shape[0] > MAX_EMPTY_LISTS:  # its nested lists would be real text: refused, not built
        spec = TensorSpec(name="x", dtype="float32", shape=[None, None])
        with pytest.raises(InputError, match="nested lists") as exc:
            decode_request(
                {"inputs": {"x": {"dtype": "float32", "shape": shape, "b64": ""}}},
                {"x": spec},
                LIMITS,
            )
        assert exc.value.reason == "too_large"
        return
    _round_trip(np.zeros(shape, np.float32))


def test_a_zero_size_shape_past_what_numpy_describes_is_a_413_not_a_500() -> None:
    """numpy refuses [0, 2**62, 2**62] (ValueError from reshape, once a 500)."""
    spec = {"x": TensorSpec(name="x", dtype="float32", shape=[None, None, None])}
    tensor = {"dtype": "float32", "shape": [0, 2**62, 2**62], "b64": ""}
    with pytest.raises(InputError, match="past what an array can describe") as exc:
        decode_request({"inputs": {"x": tensor}}, spec, LIMITS)
    assert exc.value.reason == "too_large"


def test_an_answer_of_empty_lists_past_the_cap_is_refused_not_built() -> None:
    """A model may turn [1, 0, n] into [n, 0]: its answer would be n empty lists."""
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="nested lists") as exc:
            encode_response({"y": np.zeros((2**40, 0), np.int64)}, {}, 0.0, body=True)
        assert exc.value.reason == "too_large"
        with pytest.raises(InputError):
            encode_response({"y": np.zeros((3, 2**30, 0), np.float32)}, {}, 0.0)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    small = encode_response({"y": np.zeros((2, 3, 0, 9), np.float32)}, {}, 0.0, body=True)
    assert json.loads(dumps(small))["outputs"]["y"] == [[[], [], []], [[], [], []]]


# --- lossless numbers ------------------------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
BOUNDARIES: list[int | float] = [
    *(s * (2**k + d) for s in (1, -1) for k in (53, 63, 64, 24, 11, 31, 32) for d in (-1, 0, 1)),
    2**64 - 1,
    -(2**63),
    0,
    1,
    -1,
    127,
    128,
    255,
    256,
    -129,
    65504,
    65519,
    65520,
    F32_MAX,
    -F32_MAX,
    float(np.nextafter(F32_MAX, np.inf)),
    F32_MAX * (1 + 2**-25),  # rounds past max: infinity
    F32_TINY,
    F32_TINY / 2,  # ties to even: 0
    F32_TINY * 0.75,
    2.0**-24,
    2.0**-25,
    2.0**-26,
    1e39,
    1e-46,
    1e308,
    0.1,
    0.5,
    1.5,
    -0.0,
    2.0**53,
    2.0**63,
    2.0**64,
    float(2**63 - 1024),
]


def _integer_fits(value: int | float, dtype: np.dtype[Any]) -> int | None:
    if isinstance(value, float) and not value.is_integer():
        return None
    info = np.iinfo(dtype)
    return int(value) if info.min <= value <= info.max else None


def _float_fits(value: int | float, dtype: np.dtype[Any]) -> float | None:
    """The oracle, without numpy's conversions: an integer must be exactly a value of the
    dtype (odd part within its bits, magnitude within its max); a fraction rounds as C rounds
    it (struct), refused when it becomes infinity or when a nonzero one becomes 0."""
    code = {"float16": "e", "float32": "f", "float64": "d"}[dtype.name]
    if isinstance(value, int):
        bits = np.finfo(dtype).nmant + 1
        odd = abs(value) >> (abs(value) & -abs(value)).bit_length() - 1 if value else 0
        fits = odd.bit_length() <= bits and Fraction(abs(value)) <= Fraction(
            float(np.finfo(dtype).max)
        )
        return float(value) if fits else None
    try:
        rounded = struct.unpack(code, struct.pack(code, value))[0]
    except OverflowError:
        return None
    if math.isinf(rounded) or (rounded == 0 and value != 0):
        return None
    return rounded


def _expected(value: int | float, dtype: np.dtype[Any]) -> Any:
    if dtype.kind == "b":
        return bool(value) if isinstance(value, int) and value in (0, 1) else None
    if dtype.kind in "iu":
        return _integer_fits(value, dtype)
    return _float_fits(value, dtype)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.one_of(
        st.sampled_from(BOUNDARIES),
        st.integers(-(2**65), 2**65),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    st.sampled_from(["alone", "after a float", "after an integer"]),
    st.sampled_from(["tensor", "oip"]),
)
def test_a_json_number_becomes_the_dtype_only_when_nothing_is_lost(
    dtype_name: str, value: int | float, neighbour: str, protocol: str
) -> None:
    """2**64-1 in uint64 came back as 0, 2**63 in int64 as -2**63, 2**53+1 in float64 as
    2**53, 1e39 in float32 as infinity: each through the same parse a request takes."""
    dtype = np.dtype(dtype_name)
    other = {"alone": [], "after a float": [1.0], "after an integer": [1]}[neighbour]
    if dtype.kind == "b":
        other = {"alone": [], "after a float": [True], "after an integer": [1]}[neighbour]
    values = [*other, value]
    spec = TensorSpec(name="x", dtype=dtype_name, shape=["batch", None])
    if protocol == "tensor":
        body = json.dumps({"inputs": {"x": [values]}}).encode()
    else:
        tensor = {"name": "x", "shape": [1, len(values)], "datatype": oip.OIP_NAME[dtype_name]}
        body = json.dumps({"inputs": [{**tensor, "data": values}]}).encode()

    def decode() -> np.ndarray:
        doc = parse_body(body)
        if protocol == "tensor":
            return decode_request(doc, {"x": spec}, LIMITS)["x"]
        return oip.decode(doc, None, {"x": spec}, ["y"], LIMITS).inputs["x"]

    want = [_expected(v, dtype) for v in values]
    if any(w is None for w in want):
        with pytest.raises(InputError, match="input 'x'") as exc:
            decode()
        assert exc.value.reason == "dtype"
        return
    got = decode()
    assert got.dtype == dtype and got.shape == (1, len(values))
    for g, w in zip(got.reshape(-1).tolist(), want, strict=True):
        assert g == w and type(g) is type(w), (values, got, want)


@pytest.mark.parametrize(
    ("dtype", "values", "fits"),
    [
        ("uint64", [0, 1, 2**64 - 1], True),  # was [0, 1, 0]
        ("int64", [-1, 2**63], False),  # was [-1, -2**63]
        ("float64", [1.0, 2**53 + 1], False),  # was rounded to 2**53
        ("float32", [1e39], False),  # was infinity
        ("float32", [F32_MAX, F32_TINY, 0.1], True),
        ("float16", [65504, 2.0**-24], True),
        ("int64", [-(2**63), 2**63 - 1], True),
    ],
)
def test_the_review_s_numbers(dtype: str, values: list[Any], fits: bool) -> None:
    spec = {"x": TensorSpec(name="x", dtype=dtype, shape=[None])}
    doc = parse_body(json.dumps({"inputs": {"x": values}}))
    if not fits:
        with pytest.raises(InputError, match="input 'x'"):
            decode_request(doc, spec, LIMITS)
        return
    got = decode_request(doc, spec, LIMITS)["x"]
    assert got.tolist() == [np.dtype(dtype).type(v).item() for v in values]
    if dtype == "uint64":
        assert got.tolist() == values


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_strict_json_has_no_nan_or_infinity(literal: str) -> None:
    with pytest.raises(InputError, match="strict JSON") as exc:
        parse_body(f'{{"inputs": {{"x": [[1, {literal}]]}}}}'.encode())
    assert exc.value.reason == "invalid_json"


def test_nan_from_a_parser_that_allows_it_is_refused_too() -> None:
    """A Lambda direct invocation arrives parsed by the runtime, which takes NaN."""
    spec = {"x": TensorSpec(name="x", dtype="float32", shape=[None])}
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError, match="input 'x'"):
            decode_request({"inputs": {"x": [1.0, value]}}, spec, LIMITS)


def test_floats_written_for_another_writer_have_the_same_digits() -> None:
    """A Lambda direct invocation's answer is written by the runtime's json.dumps: its float32
    numbers are the 9-digit ones, never float64's 17 (0.10000000149011612)."""
    array = np.array([[0.1, 1.0, 1e8, -3.4028235e38, 1.4e-45, np.nan]], np.float32)
    plain = encode_response({"y": array}, {}, 0.0)["outputs"]["y"]
    text = json.dumps(plain)
    assert "0.100000001" in text and "0.10000000149011612" not in text
    assert plain[0][-1] is None
    body = json.loads(dumps(encode_response({"y": array}, {}, 0.0, body=True)))["outputs"]["y"]
    assert body == plain
    np.testing.assert_array_equal(np.array(plain, np.float32)[:, :-1], array[:, :-1])
    request = oip.OipRequest({}, None, False)
    (tensor,) = oip.answer_doc(request, {"y": array}, "m", "1")[0]["outputs"]
    assert json.dumps(tensor["data"]) == json.dumps(plain[0])


# --- parameters with ranges ------------------------------------------------------------------

SPECS = {"x": TensorSpec(name="x", dtype="float32", shape=["batch", 2])}


def _oip(**extra: Any) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    return json.dumps({**doc, **extra}).encode()


def _decode(body: bytes) -> oip.OipRequest:
    return oip.decode(parse_body(body), None, SPECS, ["y", "z"], LIMITS)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"parameters": {"timeout": 10**400}}, "timeout must be a number from 0"),
        ({"parameters": {"timeout": 2**64}}, "timeout must be a number from 0"),
        ({"parameters": {"timeout": -1}}, "timeout must be a number from 0"),
        ({"parameters": {"timeout": "5"}}, "timeout must be a number from 0"),
        ({"parameters": {"timeout": True}}, "timeout must be a number from 0"),
        ({"parameters": {"timeout": 1e300}}, "timeout must be a number from 0"),
        ({"parameters": {"priority": 2**64}}, "priority must be an integer"),
        ({"parameters": {"priority": -1}}, "priority must be an integer"),
        ({"parameters": {"priority": 1.5}}, "priority must be an integer"),
        ({"id": "r" * 129}, "the cap is 128"),
        ({"id": "a\u0001b"}, "without control characters"),
        ({"id": "a\ud800b"}, "lone surrogates"),
        ({"id": 7}, "id must be a string"),
        ({"outputs": [{"name": "y"}, {"name": "y"}]}, "asked for twice"),
        ({"outputs": [{"name": "q" * 100_000}]}, "unknown output 'qqqq"),
    ],
)
def test_every_parameter_is_checked_with_a_range(extra: dict[str, Any], says: str) -> None:
    body = _oip(**extra)
    with pytest.raises(InputError, match=says) as exc:
        _decode(body)
    assert exc.value.reason in ("invalid", "unknown_output")
    assert len(str(exc.value)) < 300  # a refusal is one line, whatever the client sent


def test_parameters_within_range_are_taken() -> None:
    request = _decode(_oip(id="r-1", parameters={"timeout": 2**64 - 1, "priority": 2**64 - 1}))
    assert request.id == "r-1" and request.timeout_s == pytest.approx((2**64 - 1) / 1e6)
    assert _decode(_oip(parameters={"timeout": 500_000})).timeout_s == 0.5
    assert _decode(_oip(parameters={"timeout": 0})).timeout_s is None
    assert _decode(_oip(id="é" * 128)).id == "é" * 128


# --- compressed bodies -----------------------------------------------------------------------

A = b'{"inputs": {"x": [[1, 2]]}}'
B = b'{"inputs": {"x": [[3, 4]]}}'


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (gzip.compress(A) + gzip.compress(B), "gzip"),  # a proxy that reads every member sees B
        (gzip.compress(A) + b"garbage", "gzip"),
        (gzip.compress(A) + b"\0" * 8, "gzip"),
        (zlib.compress(A) + b"x", "deflate"),
        (zlib.compress(A) + zlib.compress(B), "deflate"),
    ],
    ids=["gzip+gzip", "gzip+garbage", "gzip+zeros", "zlib+byte", "zlib+zlib"],
)
def test_a_compressed_body_is_exactly_one_member(body: bytes, encoding: str) -> None:
    with pytest.raises(InputError, match="follow the end") as exc:
        decoded(body, encoding, 1 << 20)
    assert exc.value.reason == "invalid"


def test_one_member_alone_is_inflated() -> None:
    assert decoded(gzip.compress(A), "gzip", 1 << 20) == A
    assert decoded(zlib.compress(A), "Deflate", 1 << 20) == A
