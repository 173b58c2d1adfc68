"""The Lambda handler under issue 18's findings 2 and 3, invoked as AWS invokes it (directly and
through an HTTP API event): "Lambda behaves the same" as ``bentoml serve`` did. A 78-byte
request of b64 ``""`` with shape ``[1, 0, 100000000]``, to a model whose output follows two
dynamic dims, had the float writer build a template for every element the shape would hold
without its zero (1.5 GB), and ``[1, 0, 2**40]`` was a 500. Numbers are converted only when
nothing is lost. The same process as the handler, as on AWS: memory is measured with
tracemalloc, which sees both Python's and numpy's allocations."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bentos import lambda_handler

# Each call may hold the request, the answer and the handler's own small state; the old writer
# held 100 million templates for the first case below.
CALL_BYTES = 8 << 20
ZERO_SHAPES = [[1, 0, 100_000_000], [1, 0, 2**40], [1, 0, 10**15]]


def _model(path: Path) -> Path:
    """``z`` float32 [batch, s, t] -> ``z_out`` (two dynamic dims after the batch), and ``u``
    uint64 [batch, n] -> ``u_out``, both unchanged."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["z"], ["z_out"]),
            helper.make_node("Identity", ["u"], ["u_out"]),
        ],
        "zero_size",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "s", "t"]),
            helper.make_tensor_value_info("u", TensorProto.UINT64, ["batch", "n"]),
        ],
        [
            helper.make_tensor_value_info("z_out", TensorProto.FLOAT, ["batch", "s", "t"]),
            helper.make_tensor_value_info("u_out", TensorProto.UINT64, ["batch", "n"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[None]:
    from modelpack import create_pack

    work = tmp_path_factory.mktemp("lambda-issue18")
    create_pack(_model(work / "z.onnx"), work / "pack", name="z", version=1, key=keys[0])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGEBENTO_PACK", str(work / "pack"))
        env.setenv("EDGEBENTO_TRUST", str(keys[1]))
        env.delenv("EDGEBENTO_PACK_URL", raising=False)
        lambda_handler.reset()
        yield
        lambda_handler.reset()


def _http(body: str, path: str = "/predict") -> dict[str, Any]:
    """An HTTP API (v2) event, as a function URL sends it."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": path}},
        "body": body,
        "isBase64Encoded": False,
    }


def _tensor(z: dict[str, Any], u: list[list[int]] | None = None) -> dict[str, Any]:
    return {"inputs": {"z": z, "u": u if u is not None else [[0]]}}


def _oip(z_shape: list[int], u_data: list[Any] | None = None) -> dict[str, Any]:
    u = u_data if u_data is not None else [0]
    return {
        "inputs": [
            {"name": "z", "shape": z_shape, "datatype": "FP32", "data": []},
            {"name": "u", "shape": [1, len(u)], "datatype": "UINT64", "data": u},
        ]
    }


def _measured(event: Any) -> tuple[Any, int]:
    """The handler's answer and the peak of what it allocated meanwhile."""
    tracemalloc.start()
    try:
        answer = lambda_handler.handler(event, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    json.dumps(answer, ensure_ascii=False).encode()  # what the runtime writes: it can
    return answer, peak


def _status(answer: dict[str, Any]) -> int:
    return int(answer.get("statusCode", 200))


@pytest.mark.parametrize("shape", ZERO_SHAPES)
def test_a_zero_size_tensor_of_any_shape_costs_nothing_on_lambda(
    served: None, shape: list[int]
) -> None:
    lambda_handler.handler(_tensor({"dtype": "float32", "shape": [1, 1, 1], "b64": "AAAAAA=="}))
    empty = {"dtype": "float32", "shape": shape, "b64": ""}
    direct, peak = _measured(_tensor(empty))
    assert _status(direct) == 200, direct
    assert direct["outputs"]["z_out"] == [[]]
    assert peak < CALL_BYTES, f"{peak >> 20} MB for a zero-size tensor"

    http, peak = _measured(_http(json.dumps(_tensor(empty))))
    assert http["statusCode"] == 200, http
    assert json.loads(http["body"])["outputs"]["z_out"] == [[]]
    assert peak < CALL_BYTES, f"{peak >> 20} MB for a zero-size tensor"

    oip, peak = _measured(_http(json.dumps(_oip(shape)), "/v2/models/z/infer"))
    assert oip["statusCode"] == 200, oip
    z_out = next(o for o in json.loads(oip["body"])["outputs"] if o["name"] == "z_out")
    assert z_out["shape"] == shape and z_out["data"] == []
    assert peak < CALL_BYTES, f"{peak >> 20} MB for a zero-size tensor"


def test_a_zero_size_shape_whose_lists_would_be_real_text_is_refused_not_built(
    served: None,
) -> None:
    """``[1, 10**8, 0]`` in nested lists is 100 million ``[]``: refused before anything runs."""
    wide = {"dtype": "float32", "shape": [1, 10**8, 0], "b64": ""}
    answer, peak = _measured(_tensor(wide))
    assert _status(answer) == 413 and answer["reason"] == "too_large", answer
    assert peak < CALL_BYTES
    ok = lambda_handler.handler(_tensor({"dtype": "float32", "shape": [1, 1, 0], "b64": ""}))
    assert _status(ok) == 200 and ok["outputs"]["z_out"] == [[[]]]


U64 = st.integers(0, 2**64 - 1)


@settings(max_examples=30)
@given(
    values=st.lists(
        U64 | st.sampled_from([0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**63, 2**64 - 1]),
        min_size=1,
        max_size=4,
    )
)
def test_uint64_numbers_come_back_exactly_on_lambda(served: None, values: list[int]) -> None:
    """tritonclient's JSON mode sent UINT64 [0, 1, 2**64-1] and got [0, 1, 0] back."""
    direct = lambda_handler.handler(
        _tensor({"dtype": "float32", "shape": [1, 0, 0], "b64": ""}, [values])
    )
    assert _status(direct) == 200, direct
    assert direct["outputs"]["u_out"] == [values]
    oip = lambda_handler.handler(_http(json.dumps(_oip([1, 0, 0], values)), "/v2/models/z/infer"))
    assert oip["statusCode"] == 200, oip
    u_out = next(o for o in json.loads(oip["body"])["outputs"] if o["name"] == "u_out")
    assert u_out["data"] == values


@pytest.mark.parametrize("value", [2**64, -1, 2.5, 1e300])
def test_a_number_uint64_would_change_is_a_400_naming_the_input_on_lambda(
    served: None, value: Any
) -> None:
    z = {"dtype": "float32", "shape": [1, 0, 0], "b64": ""}
    direct = lambda_handler.handler(_tensor(z, [[0, value]]))
    assert _status(direct) == 400 and direct["reason"] == "dtype", direct
    assert "'u'" in direct["error"]
    oip = lambda_handler.handler(
        _http(json.dumps(_oip([1, 0, 0], [0, value])), "/v2/models/z/infer")
    )
    assert oip["statusCode"] == 400, oip
    assert "'u'" in json.loads(oip["body"])["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused_on_lambda(served: None, literal: str) -> None:
    body = '{"inputs": {"z": [[[LITERAL]]], "u": [[0]]}}'.replace("LITERAL", literal)
    answer = lambda_handler.handler(_http(body))
    assert answer["statusCode"] == 400, answer
    assert json.loads(answer["body"])["reason"] == "invalid_json"


def _bool_model(path: Path) -> Path:
    """``b`` bool [batch, n] -> ``b_out``, unchanged."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["b_out"])],
        "flags",
        [helper.make_tensor_value_info("b", TensorProto.BOOL, ["batch", "n"])],
        [helper.make_tensor_value_info("b_out", TensorProto.BOOL, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_an_empty_bool_tensor_is_taken_as_any_other_dtype_is(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """OIP ``data: []`` (and tensor JSON ``[[]]``) of a BOOL input was a 400 "expected bool (0
    or 1), got float64": numpy reads an empty list as float64. Every other dtype took it."""
    from modelpack import create_pack

    create_pack(
        _bool_model(tmp_path / "b.onnx"), tmp_path / "pack", name="b", version=1, key=keys[0]
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGEBENTO_PACK", str(tmp_path / "pack"))
        env.setenv("EDGEBENTO_TRUST", str(keys[1]))
        env.delenv("EDGEBENTO_PACK_URL", raising=False)
        lambda_handler.reset()
        try:
            oip = {"inputs": [{"name": "b", "shape": [1, 0], "datatype": "BOOL", "data": []}]}
            answer = lambda_handler.handler(_http(json.dumps(oip), "/v2/models/b/infer"))
            assert answer["statusCode"] == 200, answer
            (out,) = json.loads(answer["body"])["outputs"]
            assert out["shape"] == [1, 0] and out["datatype"] == "BOOL" and out["data"] == []
            direct = lambda_handler.handler({"inputs": {"b": [[]]}})
            assert _status(direct) == 200 and direct["outputs"]["b_out"] == [[]], direct
            flags = lambda_handler.handler({"inputs": {"b": [[True, False, 1, 0]]}})
            assert flags["outputs"]["b_out"] == [[True, False, True, False]], flags
            refused = lambda_handler.handler({"inputs": {"b": [[2]]}})
            assert _status(refused) == 400 and refused["reason"] == "dtype", refused
        finally:
            lambda_handler.reset()
