"""The Open Inference Protocol v2 through ``bentoml serve``, with two independent clients:
tritonclient used with its defaults (binary tensors both ways), and plain httpx speaking the
KServe v2 REST JSON exactly as the protocol's specification writes it."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serving_common import Process, import_to_store, start_bento
from tests.support import serving_models
from tests.support.bento_servers import started_together

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[dict[str, Process]]:
    """``add`` v3 (a + b), and ``tiny`` v1 (the MLP), started at once."""
    from modelpack import create_pack

    work = tmp_path_factory.mktemp("oip")
    create_pack(
        serving_models.add_two(work / "add.onnx"), work / "add", name="add", version=3, key=keys[0]
    )
    create_pack(mlp_model, work / "tiny", name="tiny", version=1, key=keys[0])
    starts = {}
    for name in ("add", "tiny"):
        tag = import_to_store(work / name, keys[1], work / "bentoml")
        starts[name] = partial(start_bento, work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
    with started_together(starts) as running:
        yield running


@pytest.fixture(scope="module")
def server(servers: dict[str, Process]) -> str:
    return servers["add"].url


@pytest.fixture(scope="module")
def triton(server: str):  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    yield client
    client.close()


def _inputs(a: np.ndarray, b: np.ndarray, binary: bool = True) -> list:  # type: ignore[type-arg]
    import tritonclient.http as httpclient

    out = []
    for name, array in (("a", a), ("b", b)):
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


def test_tritonclient_with_its_defaults(triton) -> None:  # type: ignore[no-untyped-def]
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("add") and triton.is_model_ready("add", "3")
    meta = triton.get_model_metadata("add")
    assert meta["name"] == "add" and meta["versions"] == ["3"]
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"a": [-1, 4], "b": [-1, 4]}
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4), np.float32), rng.standard_normal((3, 4), np.float32)
    result = triton.infer("add", _inputs(a, b), request_id="r-7")
    np.testing.assert_array_equal(result.as_numpy("y"), a + b)
    assert result.get_response()["id"] == "r-7"
    assert result.get_response()["model_version"] == "3"


def test_tritonclient_json_tensors_and_requested_outputs(triton) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    a, b = np.ones((2, 4), np.float32), np.full((2, 4), 2, np.float32)
    for binary_out in (False, True):
        out = [httpclient.InferRequestedOutput("y", binary_data=binary_out)]
        result = triton.infer("add", _inputs(a, b, binary=False), model_version="3", outputs=out)
        np.testing.assert_array_equal(result.as_numpy("y"), a + b)


def test_tritonclient_sees_the_errors(triton) -> None:  # type: ignore[no-untyped-def]
    from tritonclient.utils import InferenceServerException

    a = np.ones((2, 4), np.float32)
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        triton.infer("nope", _inputs(a, a))
    with pytest.raises(InferenceServerException, match="no version '9'"):
        triton.infer("add", _inputs(a, a), model_version="9")
    with pytest.raises(InferenceServerException, match="same number of rows"):
        triton.infer("add", _inputs(a, np.ones((1, 4), np.float32)))
    assert not triton.is_model_ready("nope")


def _spec_request(a: np.ndarray, b: np.ndarray) -> dict:  # type: ignore[type-arg]
    return {
        "id": "42",
        "inputs": [
            {
                "name": "a",
                "shape": list(a.shape),
                "datatype": "FP32",
                "data": a.reshape(-1).tolist(),
            },
            {"name": "b", "shape": list(b.shape), "datatype": "FP32", "data": b.tolist()},  # nested
        ],
        "outputs": [{"name": "y"}],
    }


def test_a_plain_http_client_speaking_the_v2_json_protocol(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/v2").json()["name"] == "edgebento"
        assert http.get("/v2/models/add").json()["platform"] == "onnxruntime_onnx"
        assert http.get("/v2/models/add/versions/3/ready").status_code == 200
        assert http.get("/v2/models/add/versions/4/ready").status_code == 404
        assert http.get("/v2/models/other").status_code == 404
        a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((2, 4), np.float32)
        reply = http.post("/v2/models/add/versions/3/infer", json=_spec_request(a, b))
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        doc = reply.json()
        assert doc["id"] == "42" and doc["model_name"] == "add"
        (y,) = doc["outputs"]
        assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 4]
        assert y["data"] == (a + b).reshape(-1).tolist()
        for body, status in (
            (
                {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [0] * 4}]},
                400,
            ),
            (
                {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [0] * 3}]},
                400,
            ),
            ({"inputs": "no"}, 400),
            ({**_spec_request(a, b), "outputs": [{"name": "zzz"}]}, 400),
        ):
            refused = http.post("/v2/models/add/infer", json=body)
            assert refused.status_code == status and refused.json()["error"]
        refused = http.post(
            "/v2/models/add/infer",
            content=b'{"inputs": []}' + b"\0" * 16,
            headers={"inference-header-content-length": "99999"},
        )
        assert refused.status_code == 400


def test_the_mlp_answers_tritonclient_like_onnx_runtime(
    servers: dict[str, Process], mlp_model: Path
) -> None:
    """A second model, to see the protocol's answers match ONNX Runtime's own run."""
    import onnxruntime as ort
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=servers["tiny"].url.removeprefix("http://"))
    try:
        x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
        tensor = httpclient.InferInput("x", [5, 8], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("tiny", [tensor])
        session = ort.InferenceSession(str(mlp_model), providers=["CPUExecutionProvider"])
        logits, probs = session.run(["logits", "probs"], {"x": x})
        np.testing.assert_allclose(result.as_numpy("probs"), probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
