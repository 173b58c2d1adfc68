from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from modelpack import Predictor, PredictorOptions
from modelpack.iosig import read_io_signature
from optimize import metrics, qdq_switch, sensitivity, verify
from optimize.data import Dataset, batch_axes, synthesize
from optimize.quantize import QuantizeConfig, quantize_with


def _two_layers(path: Path) -> Path:
    rng = np.random.default_rng(0)
    smooth = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    spiky = (rng.standard_normal((8, 8)) * 0.01).astype(np.float32)
    spiky[0, 0] = 40.0  # one outlier weight: per-tensor int8 loses every other weight
    nodes = [
        helper.make_node("MatMul", ["x", "smooth"], ["h"], name="smooth_mm"),
        helper.make_node("MatMul", ["h", "spiky"], ["y"], name="spiky_mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(smooth, "smooth"), numpy_helper.from_array(spiky, "spiky")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _margin(
    model: Path, per_channel: bool, static: bool = False, metric: str = "cosine>=0.99999"
) -> tuple[Any, Any]:
    inputs, outputs = read_io_signature(model)
    # Fixed data, not synthesize's draws: what the greedy finds depends on the activations.
    feeds = {"x": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    data = Dataset(feeds, None, batch_axes(inputs, feeds), synthetic=True)
    if static:  # switched on the real QDQ model that ORT's quantizer writes
        qdq = model.with_name("qdq.onnx")
        config = QuantizeConfig(mode="static", per_channel=per_channel, calibration_rows=16)
        quantize_with(data)(model, qdq, config)
        switchable = qdq_switch.build(qdq, model)
    else:
        switchable = sensitivity.build(model, per_channel=per_channel, reduce_range=False)
    spec = metrics.MetricSpec.parse(metric)
    plan = [metrics.MetricSpec(spec.name, "y", spec.reduction, spec.bound)]
    rows = verify.rows_first(data)

    def run(predictor: Any, flags: Any) -> dict[str, np.ndarray]:
        return verify.run_all(predictor, data, 16, {"y": 0}, flags)

    def margin(reference: Any, found: Any) -> float:
        return min(s.margin for s in metrics.evaluate(plan, reference, found, rows, None, 0.01))

    return switchable, sensitivity.scorer(switchable, outputs, data, run, margin)


def test_all_switches_off_is_fp32_and_on_is_int8(tmp_path: Path) -> None:
    model = _two_layers(tmp_path / "m.onnx")
    switchable, score = _margin(model, per_channel=False)
    assert switchable.nodes == ("smooth_mm", "spiky_mm")
    assert score(np.zeros(2, bool)) == pytest.approx(1e-5)  # cosine 1.0 against its bound
    assert score(np.ones(2, bool)) < 0  # int8 with one outlier weight misses the budget


def test_greedy_keeps_the_node_with_an_outlier_weight_in_float(tmp_path: Path) -> None:
    model = _two_layers(tmp_path / "m.onnx")
    switchable, score = _margin(model, per_channel=False)
    exclusion = sensitivity.greedy(switchable, score, deadline=time.monotonic() + 60)
    assert exclusion.order == ("spiky_mm",) and exclusion.start == 1
    assert exclusion.margins[0] < 0 <= exclusion.margins[-1]
    # Static QDQ is switched on ORT's own quantized model: its int8 error is real, and keeping
    # one node in float brings the worst error within the bound.
    switchable, score = _margin(model, per_channel=False, static=True, metric="max-abs<=0.5")
    exclusion = sensitivity.greedy(switchable, score, deadline=time.monotonic() + 60)
    assert score(np.zeros(2, bool)) == pytest.approx(0.5)  # all switches off: no error
    assert len(exclusion.order) == 1 and exclusion.start == 1
    assert exclusion.margins[0] < 0 <= exclusion.margins[-1]
    # Per-channel scales confine the outlier to its column: the simulated metric improves.
    _per_channel, score_pc = _margin(model, per_channel=True)
    _, score_pt = _margin(model, per_channel=False)
    assert score_pc(np.ones(2, bool)) > score_pt(np.ones(2, bool))


def test_the_static_switch_restores_the_activations_qdq_folded(tmp_path: Path) -> None:
    # Conv -> Relu -> Conv: ORT's QDQ drops the Relu (the uint8 range clamps at 0). With every
    # switch off, the graph must give FP32's output, Relu included.
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    inputs, outputs = read_io_signature(path)
    data = synthesize(path, inputs, rows=16)
    qdq = tmp_path / "qdq.onnx"
    quantize_with(data)(path, qdq, QuantizeConfig(mode="static", per_channel=True))
    assert "Relu" not in {n.op_type for n in onnx.load(str(qdq)).graph.node}
    switchable = qdq_switch.build(qdq, path)
    predictor = Predictor(switchable.model, [], outputs, PredictorOptions(warmup=False))
    flags = {sensitivity.FLAGS: np.zeros(len(switchable.nodes), bool)}
    fp32 = Predictor(path, [], outputs, PredictorOptions(warmup=False))
    x = data.inputs["x"][:4]
    got = predictor.run({"x": x} | flags, validate=False)["y"]
    expected = fp32.run({"x": x}, validate=False)["y"]
    # Without the Relu put back, negative values would pass through.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Switched on, the graph is the quantized model's function: its QDQ pairs run in float, as
    # ONNX Runtime runs the QDQ model unfused (fused, an int8 kernel rounds its own way: on
    # AVX2 without VNNI, one output in nine moved by one step).
    import onnxruntime as ort

    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    qdq_out = ort.InferenceSession(str(qdq), unfused, providers=["CPUExecutionProvider"])
    on = {sensitivity.FLAGS: np.ones(len(switchable.nodes), bool)}
    np.testing.assert_allclose(
        predictor.run({"x": x} | on, validate=False)["y"],
        qdq_out.run(["y"], {"x": x})[0],
        rtol=1e-4,
        atol=1e-4,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(1, n),  # where the simulation says to begin
            st.integers(1, n + 1),  # the fewest that pass for real; n + 1: none does
            st.integers(1, 12),
        )
    )
)
def test_the_shortest_prefix_is_found_from_where_the_simulation_begins(
    case: tuple[int, int, int, int],
) -> None:
    """Whether the real fewest is below or above the simulation's count, the search finds it
    when its tries allow, asks only counts in 1..n, never one twice, and answers a count that
    passed."""
    n, start, fewest, tries = case
    asked: list[int] = []

    def passes(k: int) -> bool:
        asked.append(k)
        return k >= fewest

    found = sensitivity.shortest_prefix(n, start, passes, tries)
    assert len(asked) <= tries and len(set(asked)) == len(asked)
    assert all(1 <= k <= n for k in asked)
    assert found is None or (found >= fewest and found in asked)
    if fewest > n:
        assert found is None
    unlimited = sensitivity.shortest_prefix(n, start, lambda k: k >= fewest, 64)
    assert unlimited == (fewest if fewest <= n else None)


def test_the_shortest_prefix_stops_when_a_run_says_stop() -> None:
    asked: list[int] = []

    def passes(k: int) -> bool | None:
        asked.append(k)
        return None if k == 4 else False

    assert sensitivity.shortest_prefix(10, 2, passes, 5) is None
    assert asked == [2, 4]
    assert sensitivity.shortest_prefix(0, 1, passes, 5) is None  # nothing to keep in float


def test_the_start_is_the_first_count_the_simulation_says_passes() -> None:
    exclusion = sensitivity.Exclusion(("a", "b", "c"), (-0.3, -0.1, 0.0, 0.2))
    assert exclusion.start == 2
    assert sensitivity.Exclusion(("a", "b"), (-0.3, -0.2, -0.1)).start == 2  # never: all of them
