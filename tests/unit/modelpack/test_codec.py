from __future__ import annotations

import base64

import numpy as np
import pytest

from modelpack import InputError, decode_request, encode_response, parse_body
from modelpack.codec import decode_tensor, encode_tensor


def test_nested_lists_decode() -> None:
    inputs = decode_request({"inputs": {"x": [[1.0, 2.0], [3.0, 4.0]]}})
    assert inputs["x"].shape == (2, 2)


def test_b64_round_trip() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    decoded = decode_tensor("x", encode_tensor(array, binary=True))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    ("value", "reason", "text"),
    [
        ("abc", "dtype", "expected numbers, got a string"),
        ([["a", "b"]], "dtype", "expected numbers, got strings"),
        ([[1, 2], [3]], "shape", "unequal lengths"),
        ([1, None], "dtype", "expected numbers"),
        ({"dtype": "float32", "shape": [2]}, "invalid", "missing b64"),
        ({"dtype": "complex64", "shape": [1], "b64": ""}, "dtype", "unknown dtype"),
        (
            {"dtype": "float32", "shape": [3], "b64": base64.b64encode(b"12345678").decode()},
            "shape",
            "8 bytes do not fill",
        ),
        ({"dtype": "float32", "shape": [1], "b64": "***"}, "invalid", "not valid base64"),
    ],
)
def test_bad_tensors_are_refused_with_a_reason(value: object, reason: str, text: str) -> None:
    with pytest.raises(InputError, match=text) as exc:
        decode_tensor("x", value)
    assert exc.value.reason == reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty_body"),
        (None, "empty_body"),
        (b"{nope", "invalid_json"),
        (b"x" * 101, "too_large"),
    ],
)
def test_bad_bodies_are_refused(body: bytes | None, reason: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_body(body, max_bytes=100)
    assert exc.value.reason == reason


@pytest.mark.parametrize("payload", [[], {"x": [1]}, {"inputs": [1, 2]}, "inputs"])
def test_request_must_be_an_inputs_object(payload: object) -> None:
    with pytest.raises(InputError, match='"inputs"'):
        decode_request(payload)


def test_response_shape() -> None:
    body = encode_response({"y": np.ones((1, 2), np.float32)}, {"name": "m", "version": 3}, 1.23456)
    assert body == {
        "outputs": {"y": [[1.0, 1.0]]},
        "model": {"name": "m", "version": 3},
        "latency_ms": 1.235,
    }
