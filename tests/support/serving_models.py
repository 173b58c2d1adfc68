"""Small ONNX models for the serving core's tests and benchmarks, built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_two(path: Path) -> Path:
    """y = a + b, with a different symbolic batch dim on each input, as tf2onnx names them."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add_two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["unk__1", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["unk__2", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__3", 4])],
    )
    return _save(graph, path)


def slow(path: Path, width: int = 256, depth: int = 24, seed: int = 0) -> Path:
    """x[batch, width] through ``depth`` MatMul+Tanh layers: a few ms per batch on one core."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, last = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]))
        last = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [last]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        weights,
    )
    return _save(graph, path)


def row_mixing(path: Path) -> Path:
    """y = x - mean(x over the batch): each row's answer depends on the other rows."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        "row_mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path)


def wide(path: Path, width: int = 16384) -> Path:
    """x[batch, width] -> y[batch, 1], the sum of each row: a large input, a small answer."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    return _save(graph, path)
