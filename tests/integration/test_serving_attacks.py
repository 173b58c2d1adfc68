"""The serving core through ``bentoml serve`` on a model unlike the float MLP (int64 and
float32 inputs, float32, float64 and scalar outputs, symbolic non-batch dims, a warmup that
fails), attacked as the review found it broke: each of these got a 500 before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.serving_common import import_to_store, start_bento
from tests.support import serving_models
from tests.support.bento_servers import started_together

pytestmark = pytest.mark.integration

IDS = np.array([[1, 4, 0], [2, 3, 3]], np.int64)
X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[str]:
    from modelpack import Samples, create_pack

    work = tmp_path_factory.mktemp("attacks")
    model = serving_models.mixed(work / "mixed.onnx")
    inputs = {"ids": IDS[:1], "x": X[:1]}
    samples = Samples(inputs, serving_models.mixed_reference(inputs["ids"], inputs["x"]))
    create_pack(model, work / "mixed", name="mixed", version=2, samples=samples, key=keys[0])
    tag = import_to_store(work / "mixed", keys[1], work / "bentoml")
    proc = start_bento(work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
    try:
        yield proc.url
    finally:
        proc.stop()


def _oip(ids: np.ndarray, x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()},
        ],
        **extra,
    }


def test_a_shape_the_graph_cannot_run_is_a_400_even_as_the_first_request(server: str) -> None:
    """An odd ``n`` fails in the Reshape with ORT's FAIL: it was a 500 carrying ORT's message.
    The pack's samples show the model itself runs, so it is the input's fault."""
    odd = np.ones((2, 3), np.float32)
    answer = httpx.post(server + "/v2/models/mixed/infer", json=_oip(IDS, odd), timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "invalid" and "onnxruntime_src" not in answer.text
    tensor = {"inputs": {"ids": IDS.tolist(), "x": odd.tolist()}}
    assert httpx.post(server + "/predict", json=tensor, timeout=30).status_code == 400
    # An id past the embedding table: ORT's INVALID_ARGUMENT, a 400 as before.
    far = httpx.post(server + "/v2/models/mixed/infer", json=_oip(IDS + 9, X), timeout=30)
    assert far.status_code == 400 and far.json()["reason"] == "invalid"


def test_tritonclient_on_int64_inputs_and_float64_and_scalar_outputs(server: str) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    want = serving_models.mixed_reference(IDS, X)
    try:
        for binary in (True, False):
            inputs = []
            for name, array, kind in (("ids", IDS, "INT64"), ("x", X, "FP32")):
                tensor = httpclient.InferInput(name, list(array.shape), kind)
                tensor.set_data_from_numpy(array, binary_data=binary)
                inputs.append(tensor)
            outputs = [
                httpclient.InferRequestedOutput("half", binary_data=binary),
                httpclient.InferRequestedOutput("total", binary_data=not binary),
            ]
            result = client.infer("mixed", inputs, outputs=outputs, request_id=f"r-{binary}")
            assert result.get_response()["id"] == f"r-{binary}"
            half = result.as_numpy("half")
            assert half.dtype == np.float64 and half.shape == (2, 2, 2)
            np.testing.assert_array_equal(half, want["half"])
            total = result.as_numpy("total")  # a 0-d output was answered with shape [1]
            assert total.shape == () and float(total) == float(want["total"])
            assert result.as_numpy("emb") is None  # not requested
            # class_count asks for Triton's classification extension (labels as BYTES): a
            # clear 400, not the raw tensor where tritonclient expects strings.
            top = [httpclient.InferRequestedOutput("emb", class_count=2)]
            with pytest.raises(InferenceServerException, match="classification"):
                client.infer("mixed", inputs, outputs=top)
            # Defaults: every output, in binary.
            everything = client.infer("mixed", inputs)
            np.testing.assert_array_equal(everything.as_numpy("emb"), want["emb"])
        # tritonclient's request compression: the body gzip- or deflate-encoded.
        for algorithm in ("gzip", "deflate"):
            packed = client.infer("mixed", inputs, request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(packed.as_numpy("half"), want["half"])
        meta = client.get_model_metadata("mixed", "2")
        assert meta["outputs"][2] == {"name": "total", "datatype": "FP32", "shape": []}
    finally:
        client.close()


def test_hostile_bodies_and_headers_are_4xx_and_the_server_lives_on(server: str) -> None:
    header = {
        "inputs": [
            {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": IDS.tolist()},
            {
                "name": "x",
                "shape": [2, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": X.nbytes},
            },
        ]
    }
    head = json.dumps(header).encode()
    infer = server + "/v2/models/mixed/infer"
    with httpx.Client(timeout=30) as http:

        def send(body: bytes, length: str) -> httpx.Response:
            # Bytes: httpx would refuse a non-ASCII str header value itself.
            headers = {b"Inference-Header-Content-Length": length.encode()}
            return http.post(infer, content=body, headers=headers)

        lengths = {
            "9" * 5000: 400,  # int() of it raised ValueError: a 500
            "-3": 400,
            str(len(head) + X.nbytes + 1): 400,
            "abc": 400,
            "\u0661\u0662": 400,  # Arabic-Indic digits, which str.isdigit accepts
            str(len(head)): 200,
        }
        for length, status in lengths.items():
            answer = send(head + X.tobytes(), length)
            assert answer.status_code == status, (length[:20], answer.text)
        # A JSON integer over Python's 4300-digit limit raised ValueError: a 500.
        huge = b'{"inputs": {"ids": [[' + b"7" * 5000 + b'] ], "x": [[1]]}}'
        assert http.post(server + "/predict", content=huge).json()["reason"] == "invalid_json"
        bad = {
            "deep": b"[" * 100_000 + b"]" * 100_000,
            "nan": b'{"inputs": {"ids": [[NaN]], "x": [[1, 2]]}}',
            "utf8": b'{"inputs": {"ids": [[1]], "x": [[1, 2]]}, "k": "\xff"}',
            # Parsers differ on which of two equal keys counts: refused, not the last one run.
            "twice": b'{"inputs": {"ids": [[1]], "x": [[1, 2]], "x": [[3, 4]]}}',
        }
        for name, body in bad.items():
            answer = http.post(server + "/predict", content=body)
            assert answer.status_code == 400, (name, answer.text)
        # "false" is not false: binary_data_output and binary_data take JSON booleans only.
        strings = _oip(IDS, X, parameters={"binary_data_output": "false"})
        assert http.post(infer, json=strings).status_code == 400
        flag = _oip(IDS, X, outputs=[{"name": "emb", "parameters": {"binary_data": "no"}}])
        assert http.post(infer, json=flag).status_code == 400
        # A gzip bomb (a small body inflating past the 64 MiB cap) and a body that is not gzip.
        import gzip

        bomb = gzip.compress(b" " * (80 << 20))
        answer = http.post(infer, content=bomb, headers={"content-encoding": "gzip"})
        assert answer.status_code == 413 and answer.json()["reason"] == "too_large"
        answer = http.post(infer, content=b"{}", headers={"content-encoding": "gzip"})
        assert answer.status_code == 400
        answer = http.post(infer, content=b"{}", headers={"content-encoding": "br"})
        assert answer.status_code == 400
        # Methods and versions.
        assert http.head(server + "/predict").status_code == 405
        assert http.head(server + "/v2/models/mixed").status_code == 200
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            wrong = http.request(method, server + "/predict", content=b"{}")
            assert wrong.status_code == 405 and wrong.json()["reason"] == "method"
        assert http.get(server + "/v2/models/mixed/versions/9").status_code == 404
        # An empty version was read as "any version".
        empty = server + "/v2/models/mixed/versions//infer"
        assert http.post(empty, json=_oip(IDS, X)).status_code == 404
        assert http.get(server + "/v2/models/mixed/versions/2/ready").status_code == 200
        # Still serving, on the same connection.
        ok = http.post(infer, json=_oip(IDS, X, id="last"))
        assert ok.status_code == 200 and ok.json()["id"] == "last"


@pytest.fixture(scope="module")
def tokens(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Iterator[dict[str, str]]:
    """Two token models declaring a sequence input (padded per batch), neither naming its
    outputs: one with an attention mask, one without (padding shows in its answers)."""
    from modelpack import SequenceInput, create_pack

    work = tmp_path_factory.mktemp("tokens")
    tags = {}
    for name, mask in (("masked", True), ("unmasked", False)):
        model = serving_models.tokens(work / f"{name}.onnx", mask=mask)
        seq = SequenceInput(input="input_ids", mask_input="attention_mask" if mask else None)
        create_pack(model, work / name, name=name, version=1, sequence=[seq], key=keys[0])
        tags[name] = import_to_store(work / name, keys[1], work / "bentoml")
    starts = {
        name: partial(start_bento, work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
        for name, tag in tags.items()
    }
    with started_together(starts) as servers:
        yield {name: proc.url for name, proc in servers.items()}


def _flood(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda b: http.post(url + "/predict", json=b), bodies * 8))


def test_sequence_requests_get_in_a_batch_exactly_what_they_get_alone(
    tokens: dict[str, str],
) -> None:
    """Padding a batch to its longest member used the manifest's symbols only: an output named
    ``unk__6`` came back padded, a mask of length 1 beside 5 ids (which the model broadcasts
    alone) was padded with zeros, and a model without a mask saw the pad tokens."""
    rng = np.random.default_rng(1)
    for url, mask in ((tokens["masked"], True), (tokens["unmasked"], False)):
        bodies: list[dict[str, Any]] = []
        for length in (2, 3, 5, 7):
            ids = rng.integers(1, 50, (1, length)).tolist()
            inputs: dict[str, Any] = {"input_ids": ids}
            if mask:
                inputs["attention_mask"] = [[1] * length]
            bodies.append({"inputs": inputs})
        if mask:
            bodies.append({"inputs": {"input_ids": [[3, 4, 5, 6, 7]], "attention_mask": [[1]]}})
        alone = [httpx.post(url + "/predict", json=b, timeout=30) for b in bodies]
        for body, one, many in zip(bodies * 8, alone * 8, _flood(url, bodies), strict=True):
            assert many.status_code == one.status_code, (body, many.text)
            if one.status_code == 200:  # batched float math may differ in the last bit
                for name, value in one.json()["outputs"].items():
                    got = many.json()["outputs"][name]
                    np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=name)
        if mask:
            assert alone[-1].status_code == 400 and alone[-1].json()["reason"] == "shape"
        assert httpx.get(url + "/metadata", timeout=30).json()["batches"]["count"] > 0
