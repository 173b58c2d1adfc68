from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpack.iosig import read_io_signature
from optimize.data import synthesize
from optimize.sensitivity import node_errors


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


def test_the_node_with_an_outlier_weight_ranks_first(tmp_path: Path) -> None:
    model = _two_layers(tmp_path / "m.onnx")
    inputs, _ = read_io_signature(model)
    data = synthesize(model, inputs, rows=16)
    errors = node_errors(model, data, per_channel=False, reduce_range=False)
    assert [e.node for e in errors] == ["spiky_mm", "smooth_mm"]
    assert errors[0].relative_error > 10 * errors[1].relative_error
    # Per-channel scales confine the outlier to its column: the error falls.
    per_channel = node_errors(model, data, per_channel=True, reduce_range=False)
    assert per_channel[0].relative_error < errors[0].relative_error
