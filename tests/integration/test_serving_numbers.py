"""Numbers, zero-size tensors, parameters and compressed bodies through a real ``bentoml serve``
(issue 18), on an identity model of every OIP datatype: tritonclient in JSON mode
(``binary_data=False``) gets back exactly what it sent at each dtype's boundaries; a number
the dtype would change is a 400 naming the input; a zero-size tensor of any shape costs
nothing; a huge timeout is the client's 400, not a counted error; a compressed body is one
gzip member or zlib stream."""

from __future__ import annotations

import base64
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.serving_common import import_to_store, start_bento
from modelpack.serving.oip import DATATYPES

pytestmark = pytest.mark.integration

MODEL = "every"
F32 = np.finfo(np.float32)
F16 = np.finfo(np.float16)
F64 = np.finfo(np.float64)


def _boundaries(dtype: str) -> np.ndarray:
    """The values at the edges of each dtype that JSON must carry unchanged."""
    kind = np.dtype(dtype)
    if kind.kind == "b":
        return np.array([True, False, True])
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return np.array([info.min, info.min + 1, 0, 1, info.max - 1, info.max], kind)
    info = np.finfo(kind)
    values = [info.max, -info.max, info.smallest_subnormal, info.tiny, 0.1, -0.0, 1.0]
    if kind == np.float64:
        values += [2.0**53, 2.0**53 - 1]
    return np.array(values, kind)


def _identity(path: Path) -> Path:
    """One input per datatype, ``in_<TYPE>`` [batch, n], answered unchanged as ``out_<TYPE>``,
    and ``z`` float32 [batch, s, t] as ``z_out``: an output that follows two dynamic dims."""
    import onnx
    from onnx import helper

    inputs, outputs, nodes = [], [], []
    for oip_type, dtype in {**DATATYPES, "Z": "float32"}.items():
        kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        name, out = (f"in_{oip_type}", f"out_{oip_type}") if oip_type != "Z" else ("z", "z_out")
        dims = ["batch", f"n_{oip_type}"] if oip_type != "Z" else ["batch", "s", "t"]
        inputs.append(helper.make_tensor_value_info(name, kind, dims))
        outputs.append(helper.make_tensor_value_info(out, kind, dims))
        nodes.append(helper.make_node("Identity", [name], [out]))
    graph = helper.make_graph(nodes, "every_dtype", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[str]:
    from modelpack import create_pack

    work = tmp_path_factory.mktemp("numbers")
    model = _identity(work / "every.onnx")
    create_pack(model, work / "every", name=MODEL, version=1, key=keys[0])
    tag = import_to_store(work / "every", keys[1], work / "bentoml")
    proc = start_bento(work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
    try:
        yield proc.url
    finally:
        proc.stop()


def _defaults() -> dict[str, np.ndarray]:
    feed = {f"in_{t}": np.zeros((1, 1), d) for t, d in DATATYPES.items()}
    return {**feed, "z": np.zeros((1, 1, 1), np.float32)}


def _oip(data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An OIP JSON request for every input: ``data`` maps a name to (shape, values)."""
    tensors = []
    for name, array in _defaults().items():
        shape, values = (data or {}).get(name, (list(array.shape), array.ravel().tolist()))
        kind = "FP32" if name == "z" else name.removeprefix("in_")
        tensors.append({"name": name, "shape": shape, "datatype": kind, "data": values})
    return {"inputs": tensors, **extra}


def _tensor(values: dict[str, Any] | None = None) -> dict[str, Any]:
    feed: dict[str, Any] = {k: v.tolist() for k, v in _defaults().items()}
    return {"inputs": {**feed, **(values or {})}}


def _counted(url: str, outcome: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    pattern = rf'^edgebento_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_tritonclient_json_mode_round_trips_every_datatype_at_its_boundaries(server: str) -> None:
    """tritonclient with ``binary_data=False``, used unchanged: UINT64 [0, 1, 2**64-1] came back
    as [0, 1, 0]. Every value at every dtype's edges now comes back bit for bit."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    try:
        sent: dict[str, np.ndarray] = {}
        inputs, outputs = [], []
        for name, array in _defaults().items():
            oip_type = "FP32" if name == "z" else name.removeprefix("in_")
            if name != "z":
                array = _boundaries(DATATYPES[oip_type]).reshape(1, -1)
            tensor = httpclient.InferInput(name, list(array.shape), oip_type)
            tensor.set_data_from_numpy(array, binary_data=False)
            inputs.append(tensor)
            out = "z_out" if name == "z" else f"out_{oip_type}"
            outputs.append(httpclient.InferRequestedOutput(out, binary_data=False))
            sent[out] = array
        result = client.infer(MODEL, inputs, outputs=outputs, request_id="edges")
        for out, array in sent.items():
            got = result.as_numpy(out)
            assert got.dtype == array.dtype and got.shape == array.shape, out
            # Bits, not values: -0.0 stays -0.0 and the smallest subnormal stays itself.
            assert got.tobytes() == array.tobytes(), (out, array, got)
        uint64 = result.as_numpy("out_UINT64").ravel().tolist()
        assert uint64[-1] == 2**64 - 1
    finally:
        client.close()


LOSSY = {
    "BOOL": 2,
    "INT8": 128,
    "INT16": -(2**15) - 1,
    "INT32": 2**31,
    "INT64": 2**63,
    "UINT8": -1,
    "UINT16": 1.5,
    "UINT32": 2**32,
    "UINT64": 2**64,
    "FP16": 65520,  # an integer float16 cannot hold
    "FP32": 1e39,  # it would become infinity
    "FP64": 2**53 + 1,  # it would be rounded to 2**53
}


@pytest.mark.parametrize("oip_type", list(DATATYPES))
def test_a_number_the_dtype_would_change_is_a_400_naming_the_input(
    server: str, oip_type: str
) -> None:
    name, value = f"in_{oip_type}", LOSSY[oip_type]
    with httpx.Client(base_url=server, timeout=30) as http:
        oip = http.post(f"/v2/models/{MODEL}/infer", json=_oip({name: ([1, 2], [0, value])}))
        tensor = http.post("/predict", json=_tensor({name: [[0, value]]}))
        for answer in (oip, tensor):
            assert answer.status_code == 400, answer.text
            assert answer.json()["reason"] == "dtype" and repr(name) in answer.json()["error"]
        # The same number in a list of floats, which numpy reads as float64 (2**64-1 -> 2**64)
        mixed = http.post(f"/v2/models/{MODEL}/infer", json=_oip({name: ([1, 2], [0.0, value])}))
        assert mixed.status_code == 400 and repr(name) in mixed.json()["error"]


def test_strict_json_refuses_nan_and_infinity(server: str) -> None:
    body = json.dumps(_tensor()).replace('"in_FP32": [[0.0]]', '"in_FP32": [[NaN]]')
    assert "NaN" in body
    for literal in ("NaN", "Infinity", "-Infinity"):
        answer = httpx.post(
            server + "/predict", content=body.replace("NaN", literal).encode(), timeout=30
        )
        assert answer.status_code == 400 and answer.json()["reason"] == "invalid_json"


def test_a_zero_size_tensor_of_any_shape_costs_nothing(server: str) -> None:
    """78 bytes of b64 "" with shape [1, 0, 100000000] took 1.5 GB and stalled every other
    client; [1, 0, 2**40] was a 500."""
    with httpx.Client(base_url=server, timeout=30) as http:
        for shape in ([1, 0, 100_000_000], [1, 0, 2**40]):
            empty = {"dtype": "float32", "shape": shape, "b64": ""}
            answer = http.post("/predict", json=_tensor({"z": empty}))
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"]["z_out"] == [[]]
            oip = http.post(f"/v2/models/{MODEL}/infer", json=_oip({"z": (shape, [])}))
            assert oip.status_code == 200, oip.text
            z_out = next(o for o in oip.json()["outputs"] if o["name"] == "z_out")
            assert z_out["shape"] == shape and z_out["data"] == []
        # Its nested lists would be real text: refused before anything runs.
        wide = {"dtype": "float32", "shape": [1, 10**8, 0], "b64": ""}
        answer = http.post("/predict", json=_tensor({"z": wide}))
        assert answer.status_code == 413 and answer.json()["reason"] == "too_large"
        assert http.post("/predict", json=_tensor()).status_code == 200  # still serving


def test_a_huge_timeout_is_a_400_and_not_counted_as_an_error(server: str) -> None:
    """``parameters.timeout`` of 1 and 400 zeros was a 500 counted in the error rate a
    rollout reads, so any client could push a canary's error rate up."""
    body = json.dumps(_oip(parameters={"timeout": 10**400})).encode()
    assert b"1" + b"0" * 400 in body
    errors = _counted(server, "error")
    for _ in range(5):
        answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, timeout=30)
        assert answer.status_code == 400 and answer.json()["reason"] == "invalid"
        assert "timeout" in answer.json()["error"]
    for params in ({"timeout": -1}, {"priority": 2**64}, {"timeout": "5"}):
        answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=_oip(parameters=params))
        assert answer.status_code == 400, params
    long_id = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=_oip(id="i" * 129))
    assert long_id.status_code == 400
    assert _counted(server, "error") == errors
    assert _counted(server, "rejected") >= 9


def test_a_compressed_body_is_exactly_one_member(server: str) -> None:
    """gzip(A) + gzip(B) was answered as A with 200: a proxy that reads every member sees
    another request than the one that runs."""
    a = json.dumps(_tensor()).encode()
    b = json.dumps(_tensor({"in_INT8": [[7]]})).encode()
    cases = [
        (gzip.compress(a), "gzip", 200),
        (zlib.compress(a), "deflate", 200),
        (gzip.compress(a) + gzip.compress(b), "gzip", 400),
        (gzip.compress(a) + b"garbage", "gzip", 400),
        (zlib.compress(a) + b"\0", "deflate", 400),
    ]
    with httpx.Client(base_url=server, timeout=30) as http:
        for body, encoding, status in cases:
            answer = http.post(
                "/predict",
                content=body,
                headers={"content-encoding": encoding, "content-type": "application/json"},
            )
            assert answer.status_code == status, (encoding, answer.text)
            if status == 400:
                assert answer.json()["reason"] == "invalid"


def test_b64_answers_and_json_answers_agree(server: str) -> None:
    """The b64 path carries what JSON cannot (NaN, infinity) and JSON answers it as null."""
    raw = np.array([[[np.nan, np.inf, 1.5]]], np.float32)
    z = {"dtype": "float32", "shape": [1, 1, 3], "b64": base64.b64encode(raw.tobytes()).decode()}
    answer = httpx.post(server + "/predict", json=_tensor({"z": z}), timeout=30)
    assert answer.status_code == 200 and answer.json()["outputs"]["z_out"] == [[[None, None, 1.5]]]
