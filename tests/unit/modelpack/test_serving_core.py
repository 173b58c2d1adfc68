"""The serving core in process: the one reason table, OIP details, the batching probe, the
cache, the gate and the limits."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelpack import Pack, create_pack, load_pack
from modelpack.errors import ConfigError, ModelInvalidError, OverloadError
from modelpack.metrics import InferenceMetrics, NoMetrics
from modelpack.predictor import Predictor
from modelpack.serving.cache import ResultCache, cache_key
from modelpack.serving.core import ServingCore
from modelpack.serving.gate import Gate
from modelpack.serving.limits import ServingLimits
from modelpack.serving.routes import HttpRequest, HttpResponse, handle, handle_sync
from tests.support import models, serving_models

ROW = [0.5] * 8


def _core(pack: Pack, **limits: int) -> tuple[ServingCore, CollectorRegistry]:
    registry = CollectorRegistry()
    core = ServingCore(ServingLimits(**limits), InferenceMetrics(registry=registry))
    core.serve(Predictor.from_pack(pack), pack.manifest)
    return core, registry


def _post(core: ServingCore, body: bytes, path: str = "/predict", **headers: str) -> HttpResponse:
    return asyncio.run(handle(core, HttpRequest("POST", path, headers, body)))


@pytest.mark.parametrize(
    ("body", "status", "reason", "says"),
    [
        (b"", 400, "empty_body", "empty"),
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 400, "invalid", '{"inputs"'),
        (json.dumps({"inputs": {"y": [ROW]}}).encode(), 400, "unknown_input", "'y'"),
        (json.dumps({"inputs": {}}).encode(), 400, "missing_input", "'x'"),
        (json.dumps({"inputs": {"x": [ROW[:3]]}}).encode(), 400, "shape", "dim 1 must be 8"),
        (json.dumps({"inputs": {"x": [["a"] * 8]}}).encode(), 400, "dtype", "string"),
        (json.dumps({"inputs": {"x": [ROW, ROW[:2]]}}).encode(), 400, "shape", "unequal"),
        (json.dumps({"inputs": {"x": []}}).encode(), 400, "shape", "rank"),
        (json.dumps({"inputs": {"x": [ROW] * 5}}).encode(), 413, "batch_too_large", "cap of 4"),
        (b'{"inputs": {"x": [' + b"0.5," * 2000 + b"0.5]}}", 413, "too_large", "cap"),
    ],
)
def test_every_refusal_has_its_status_and_reason_and_is_counted(
    mlp_pack: Pack, body: bytes, status: int, reason: str, says: str
) -> None:
    core, registry = _core(mlp_pack, max_body_bytes=4096, max_rows=4)
    answer = _post(core, body)
    assert answer.status == status
    assert answer.doc()["reason"] == reason and says in answer.doc()["error"]
    assert registry.get_sample_value("edgebento_input_rejected_total", {"reason": reason}) == 1
    sync = handle_sync(core, HttpRequest("POST", "/predict", {}, body))
    assert (sync.status, sync.doc()) == (answer.status, answer.doc())  # the same everywhere


def test_nan_and_inf_outputs_are_null_in_both_protocols(mlp_pack: Pack) -> None:
    core, _ = _core(mlp_pack)
    # JSON cannot carry infinity (1e999 is refused: it is no float32), raw bytes can.
    raw = np.array([[np.inf] + [0] * 7], np.float32).tobytes()
    b64 = {"dtype": "float32", "shape": [1, 8], "b64": base64.b64encode(raw).decode()}
    tensor = _post(core, json.dumps({"inputs": {"x": b64}}).encode())
    assert tensor.status == 200 and None in tensor.doc()["outputs"]["probs"][0]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    answer = _post(
        core,
        header + raw,
        "/v2/models/tiny/infer",
        **{"inference-header-content-length": str(len(header))},
    )
    probs = next(o for o in answer.doc()["outputs"] if o["name"] == "probs")
    assert None in probs["data"]


def test_oip_integer_inputs_datatypes_and_flat_data(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    model = models.two_inputs(tmp_path / "two.onnx")
    create_pack(model, tmp_path / "two", name="two", version=2, key=keys[0])
    core, _ = _core(load_pack(tmp_path / "two", [keys[1]]))
    request = {
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [1] * 8},
            {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [[2], [3]]},
        ]
    }
    answer = _post(core, json.dumps(request).encode(), "/v2/models/two/versions/2/infer")
    assert answer.status == 200
    assert answer.doc()["outputs"][0]["data"] == [2.0] * 4 + [3.0] * 4
    request["inputs"][1]["datatype"] = "INT32"  # not what the model declares
    assert (
        _post(core, json.dumps(request).encode(), "/v2/models/two/infer").doc()["reason"] == "dtype"
    )
    request["inputs"][1] |= {"datatype": "INT64", "data": [2.5, 3]}  # lossy
    assert (
        _post(core, json.dumps(request).encode(), "/v2/models/two/infer").doc()["reason"] == "dtype"
    )
    binary = {
        "inputs": [
            {
                "name": "a",
                "shape": [1, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            }
        ]
    }
    header = json.dumps(binary).encode()
    short = _post(
        core,
        header + b"\0" * 8,
        "/v2/models/two/infer",
        **{"inference-header-content-length": str(len(header))},
    )
    assert short.status == 400


def test_a_model_whose_rows_interact_is_never_batched(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    model = serving_models.row_mixing(tmp_path / "mix.onnx")
    create_pack(model, tmp_path / "mix", name="mix", version=1, key=keys[0])
    core, _ = _core(load_pack(tmp_path / "mix", [keys[1]]))
    assert core.model is not None
    assert core.model.batching_off and "other rows" in core.model.batching_off
    assert core.model.batcher.max_rows == 1
    assert core.model.metadata()["batching"] is False


def test_a_model_with_string_inputs_is_refused_at_pack_create(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "s.onnx"))
    with pytest.raises(ModelInvalidError, match="string tensor"):
        create_pack(tmp_path / "s.onnx", tmp_path / "pack", name="s", version=1)


def test_the_cache_is_keyed_by_dtype_shape_and_bytes_and_bounded(mlp_pack: Pack) -> None:
    a = {"x": np.zeros((1, 4), np.float32)}
    assert cache_key(a) != cache_key({"x": np.zeros((4, 1), np.float32)})
    assert cache_key(a) != cache_key({"x": np.zeros((1, 4), np.float64)})
    cache = ResultCache(max_bytes=1000)
    for i in range(20):
        cache.put(bytes([i]), {"y": np.full(50, i, np.float32)})  # about 265 bytes each
    assert cache.bytes <= 1000 and cache.get(bytes([19])) is not None
    assert cache.get(bytes([0])) is None  # the least recently used went first
    core, registry = _core(mlp_pack, cache_bytes=1 << 20)
    body = json.dumps({"inputs": {"x": [ROW]}}).encode()
    assert _post(core, body).doc()["outputs"] == _post(core, body).doc()["outputs"]
    assert registry.get_sample_value("edgebento_cache_hits_total") == 1
    assert registry.get_sample_value("edgebento_cache_misses_total") == 1


def test_the_gate_bounds_waiters_and_their_wait() -> None:
    gate = Gate(running=1, max_queue=1, retry_after_s=2, metrics=NoMetrics())
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.slot(time.monotonic() + 5):
            held.set()
            release.wait(5)

    threading.Thread(target=hold).start()
    held.wait(5)
    waiter_error: list[BaseException] = []

    def wait_short() -> None:
        try:
            with gate.slot(time.monotonic() + 0.3):
                pass
        except OverloadError as exc:
            waiter_error.append(exc)

    waiter = threading.Thread(target=wait_short)
    waiter.start()
    time.sleep(0.05)
    with pytest.raises(OverloadError) as full, gate.slot(time.monotonic() + 5):
        pass
    assert full.value.reason == "queue_full" and full.value.retry_after_s == 2
    waiter.join(5)
    assert waiter_error and waiter_error[0].reason == "deadline"  # type: ignore[attr-defined]
    release.set()


def test_limits_from_the_environment() -> None:
    limits = ServingLimits.from_env({"EDGEBENTO_MAX_QUEUE": "3", "EDGEBENTO_DEADLINE_S": "0.5"})
    assert (limits.max_queue, limits.deadline_s) == (3, 0.5)
    assert limits.deadline(10) == 0.5 and limits.deadline(0.1) == 0.1
    with pytest.raises(ConfigError, match="EDGEBENTO_MAX_QUEUE"):
        ServingLimits.from_env({"EDGEBENTO_MAX_QUEUE": "many"})
    with pytest.raises(ConfigError, match="negative"):
        ServingLimits.from_env({"EDGEBENTO_DEADLINE_S": "-1"})


def test_documents_and_routes(mlp_pack: Pack) -> None:
    core, _ = _core(mlp_pack)

    def get(path: str) -> HttpResponse:
        return handle_sync(core, HttpRequest("GET", path))

    assert get("/v2/health/ready").status == 200
    assert get("/v2/models/tiny").doc()["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 8]}
    ]
    assert get("/v2/models/tiny/versions/1/ready").doc()["ready"] is True
    assert get("/v2/models/tiny/versions/2").status == 404
    assert get("/v2/models/tiny/infer").status == 405
    assert get("/metadata").doc()["batching"] is True
    empty = ServingCore()
    assert handle_sync(empty, HttpRequest("GET", "/v2/health/ready")).status == 503
    assert handle_sync(empty, HttpRequest("POST", "/predict", {}, b"{}")).status == 503


# --- isolation, in process: many more examples than over HTTP --------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


@pytest.fixture(scope="module")
def add_core(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> ServingCore:
    work = tmp_path_factory.mktemp("add")
    create_pack(
        serving_models.add_two(work / "add.onnx"), work / "add", name="add", version=1, key=keys[0]
    )
    core = ServingCore(ServingLimits(max_batch_rows=8))
    pack = load_pack(work / "add", [keys[1]])
    core.serve(Predictor.from_pack(pack), pack.manifest)
    return core


def _tensor(array: np.ndarray, b64: bool) -> object:
    import base64

    if not b64:
        return array.tolist()
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "b64": base64.b64encode(array.tobytes()).decode(),
    }


_floats = st.floats(-1e3, 1e3, width=32, allow_nan=False)
_array = st.tuples(st.integers(0, 3), st.sampled_from([4, 4, 4, 2])).flatmap(
    lambda shape: arrays(np.float32, shape, elements=_floats)
)


@st.composite
def _body(draw: st.DrawFn) -> bytes:
    a, b = draw(_array), draw(_array)
    if draw(st.booleans()):
        b = draw(arrays(np.float32, a.shape, elements=_floats))
    inputs = {"a": _tensor(a, draw(st.booleans())), "b": _tensor(b, draw(st.booleans()))}
    return json.dumps({"inputs": inputs}).encode()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bodies=st.lists(_body(), min_size=2, max_size=30))
def test_requests_batched_together_get_what_they_get_alone(
    add_core: ServingCore, bodies: list[bytes]
) -> None:
    def outcome(answer: HttpResponse) -> tuple[int, object]:
        doc = answer.doc()
        return answer.status, doc.get("outputs", doc.get("reason"))

    async def together() -> list[HttpResponse]:
        return await asyncio.gather(
            *(handle(add_core, HttpRequest("POST", "/predict", {}, b)) for b in bodies)
        )

    batched = [outcome(a) for a in asyncio.run(together())]
    alone = [outcome(handle_sync(add_core, HttpRequest("POST", "/predict", {}, b))) for b in bodies]
    assert batched == alone


def test_the_documented_reason_table_is_the_one_the_core_uses() -> None:
    import re

    from modelpack.serving.reasons import STATUS_BY_REASON

    doc = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d{3})", doc, flags=re.MULTILINE))
    assert {k: int(v) for k, v in rows.items()} == STATUS_BY_REASON


def test_a_shape_the_graph_cannot_run_is_the_clients_once_the_model_has_answered(
    tmp_path: Path,
) -> None:
    """ORT fails with FAIL (not INVALID_ARGUMENT) when client-chosen symbolic dims do not fit
    the graph. Without samples and with a failing warmup, that is a 500 until the model has
    answered once (it might be broken); after that, the same request is the client's: 400."""
    model = serving_models.mixed(tmp_path / "mixed.onnx")
    create_pack(model, tmp_path / "pack", name="mixed", version=1)
    core = ServingCore()
    core.serve(Predictor(model, *_io(tmp_path / "pack")), None)
    ids = [[1, 2]]
    odd = json.dumps({"inputs": {"ids": ids, "x": [[1.0, 2.0, 3.0]]}}).encode()
    good = json.dumps({"inputs": {"ids": ids, "x": [[1.0, 2.0, 3.0, 4.0]]}}).encode()
    assert handle_sync(core, HttpRequest("POST", "/predict", {}, odd)).status == 500
    assert handle_sync(core, HttpRequest("POST", "/predict", {}, good)).status == 200
    for send in (handle_sync, lambda c, r: asyncio.run(handle(c, r))):
        answer = send(core, HttpRequest("POST", "/predict", {}, odd))
        assert answer.status == 400 and answer.doc()["reason"] == "invalid"
        assert "cannot be reshaped" in answer.doc()["error"]


def _io(pack: Path) -> tuple[list, list]:
    manifest = load_pack(pack, [], allow_unsigned=True).manifest
    return list(manifest.inputs), list(manifest.outputs)


def test_a_rank_past_numpys_limit_is_a_400_for_a_model_of_unknown_rank(tmp_path: Path) -> None:
    """A shape of rank 70 reached numpy's reshape, whose ValueError was a 500."""
    import onnx
    from onnx import TensorProto, helper

    from modelpack import TensorSpec

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "anyrank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    anyrank = [TensorSpec(name="x", dtype="float32")]  # shape None: any rank
    core = ServingCore()
    core.serve(Predictor(tmp_path / "m.onnx", anyrank, [TensorSpec(name="y", dtype="float32")]))
    shape = [1] * 70
    oip = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [1.0]}]}
    b64 = {"inputs": {"x": {"dtype": "float32", "shape": shape, "b64": "AAAAAA=="}}}
    for path, doc in (("/v2/models/model/infer", oip), ("/predict", b64)):
        answer = handle_sync(core, HttpRequest("POST", path, {}, json.dumps(doc).encode()))
        assert answer.status == 400 and answer.doc()["reason"] == "shape", answer.body


def test_question_mark_dims_are_not_one_symbol() -> None:
    """paddle2onnx writes every free dim as "?": a 48x192 image must pass [-1, 3, ?, ?]."""
    from modelpack.manifest import TensorSpec
    from modelpack.serving.limits import ServingLimits
    from modelpack.serving.tensors import check_feed

    spec = TensorSpec(name="x", dtype="float32", shape=[None, 3, "?", "?"])
    feed = {"x": np.zeros((1, 3, 48, 192), np.float32)}
    assert check_feed({"x": spec}, feed, ServingLimits()) == 1
