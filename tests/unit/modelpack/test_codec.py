from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelpack import InputError, decode_request, encode_response, parse_body
from modelpack.codec import decode_tensor, dumps, encode_tensor, numbers
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import ServingLimits

X = TensorSpec(name="x", dtype="float32", shape=["batch", None])
SPECS = {"x": X}


def test_nested_lists_decode() -> None:
    inputs = decode_request({"inputs": {"x": [[1.0, 2.0], [3.0, 4.0]]}}, SPECS)
    assert inputs["x"].shape == (2, 2) and inputs["x"].dtype == np.float32


def test_b64_round_trip() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    decoded = decode_tensor(X, encode_tensor(array, binary=True), ServingLimits())
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, array)


def _b64(shape: list[int], raw: bytes = b"", dtype: str = "float32") -> dict:
    return {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode()}


@pytest.mark.parametrize(
    ("value", "reason", "text"),
    [
        ("abc", "dtype", "expected numbers, got a string"),
        ([["a", "b"]], "dtype", "expected numbers, got strings"),
        ([[1, 2], [3]], "shape", "unequal lengths"),
        ([1, None], "dtype", "expected numbers"),
        ([[10**400]], "dtype", "is not exactly a float32"),
        ({"dtype": "float32", "shape": [2]}, "invalid", "missing b64"),
        ({"dtype": "complex64", "shape": [1], "b64": ""}, "dtype", "the model takes float32"),
        (_b64([1, 2], b"\0" * 8, "float64"), "dtype", "the model takes float32"),
        (_b64([1, 3], b"12345678"), "shape", "cannot hold shape"),
        ({"dtype": "float32", "shape": [1, 1], "b64": "*******="}, "invalid", "not valid base64"),
        # int64 products that wrap around, and dims no machine can hold: refused before decoding
        (_b64([2**62, 4]), "too_large", "elements; the cap"),
        (_b64([2**64, 4]), "too_large", "elements; the cap"),
        (_b64([-1, 4]), "shape", "negative"),
        (_b64([1]), "shape", "expected rank 2"),
        ({"dtype": "float32", "shape": [1, True], "b64": ""}, "shape", "list of integers"),
    ],
)
def test_bad_tensors_are_refused_with_a_reason(value: object, reason: str, text: str) -> None:
    with pytest.raises(InputError, match=text) as exc:
        decode_tensor(X, value, ServingLimits())
    assert exc.value.reason == reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty_body"),
        (None, "empty_body"),
        (b"{nope", "invalid_json"),
        (b"x" * 201, "too_large"),
        (b"[" * 60 + b"]" * 60, "too_large"),  # more lists than the number cap
        (b"[1" + b",1" * 60 + b"]", "too_large"),
    ],
)
def test_bad_bodies_are_refused_before_parsing(body: bytes | None, reason: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_body(body, ServingLimits(max_body_bytes=200, max_json_numbers=50))
    assert exc.value.reason == reason


@pytest.mark.parametrize("payload", [[], {"x": [1]}, {"inputs": [1, 2]}, "inputs"])
def test_request_must_be_an_inputs_object(payload: object) -> None:
    with pytest.raises(InputError, match='"inputs"'):
        decode_request(payload, SPECS)


def test_response_shape_with_nan_and_inf_as_null() -> None:
    body = encode_response(
        {"y": np.array([[1.0, np.nan, np.inf]], np.float32)}, {"name": "m", "version": 3}, 1.23456
    )
    assert body == {
        "outputs": {"y": [[1.0, None, None]]},
        "model": {"name": "m", "version": 3},
        "latency_ms": 1.235,
    }


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float16]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_written_numbers_name_each_float_exactly(array: np.ndarray) -> None:
    """The body's numbers, written at the digits their width holds, parse back to the very same
    floats, nested as ``tolist()`` nests them; integral values stay floats."""
    parsed = json.loads(dumps({"y": numbers(array)}))["y"]
    np.testing.assert_array_equal(np.asarray(parsed, dtype=array.dtype).reshape(array.shape), array)
    assert json.dumps(parsed).count("[") == json.dumps(array.tolist()).count("[")
    flat = np.asarray(parsed, dtype=object).reshape(-1) if array.size else []
    assert all(isinstance(v, float) for v in flat)


def test_numbers_whose_integer_part_fills_every_digit_are_still_json() -> None:
    """printf writes 1e8 at 9 digits as '100000000.', which JSON refuses (found by CI)."""
    for dtype, values in [
        (np.float32, [1e8, -123456789.0, 999999936.0, 0.5]),
        (np.float16, [65504.0, -10000.0, 12344.0, 1.0]),
    ]:
        array = np.array([values, values[::-1]], dtype)
        text = dumps({"y": numbers(array)})
        assert b".," not in text and b".]" not in text
        np.testing.assert_array_equal(np.asarray(json.loads(text)["y"], dtype), array)


def test_numbers_write_nan_as_null_and_fall_back_to_lists_for_float64_and_ints() -> None:
    assert json.loads(dumps(numbers(np.array([1.0, np.nan, -np.inf], np.float32)))) == [
        1.0,
        None,
        None,
    ]
    assert numbers(np.array([0.1], np.float64)) == [0.1]
    assert numbers(np.array([[1, 2]], np.int64)) == [[1, 2]]
    assert dumps(numbers(np.float32(2.5))) == b"2.50000000"
    assert dumps(numbers(np.float32(1e8))) == b"100000000.0"


def test_a_client_string_cannot_pose_as_the_place_of_numbers() -> None:
    """dumps splices the numbers where its own random mark is: a string the client sent (an OIP
    id) with a mark-like text in it comes back as it was sent."""
    tricks = ["\0" + "0" * 16 + "0\0", "\\u0000", '"\0abc0\0"']
    for trick in tricks:
        doc = json.loads(dumps({"id": trick, "y": numbers(np.ones((1, 2), np.float32))}))
        assert doc == {"id": trick, "y": [[1.0, 1.0]]}


def test_the_body_and_the_document_carry_the_same_answer() -> None:
    outputs = {"y": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    plain = encode_response(outputs, {"name": "m", "version": 1}, 1.0)
    body = json.loads(dumps(encode_response(outputs, {"name": "m", "version": 1}, 1.0, body=True)))
    np.testing.assert_array_equal(
        np.float32(body["outputs"]["y"]), np.float32(plain["outputs"]["y"])
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('\0\\u0123456789abcdef"')))
def test_any_client_string_comes_back_as_sent_beside_numbers(text: str) -> None:
    doc = json.loads(dumps({"id": text, "y": numbers(np.ones(3, np.float32)), "z": text}))
    assert doc == {"id": text, "y": [1.0, 1.0, 1.0], "z": text}
