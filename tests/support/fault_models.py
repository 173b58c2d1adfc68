"""Models a client can make ONNX Runtime fail on, built in code (the fault-classification tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.serving_models import _save


def divide(path: Path) -> Path:
    """y = a // b on int64 [n, 2]: ``b = 0`` fails in ONNX Runtime (integer division by zero)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Div", ["a", "b"], ["y"])],
        "divide",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 2])],
    )
    return _save(graph, path)


def rows_of_three(path: Path) -> Path:
    """y = x on float32 [n, 4] through a Reshape to [-1, 12] and back: the batch must be a
    multiple of 3, or ONNX Runtime fails (FAIL, not INVALID_ARGUMENT)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "wide"], ["t"]),
            helper.make_node("Reshape", ["t", "back"], ["y"]),
        ],
        "rows_of_three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [
            numpy_helper.from_array(np.array([-1, 12], np.int64), "wide"),
            numpy_helper.from_array(np.array([-1, 4], np.int64), "back"),
        ],
    )
    return _save(graph, path)


def divide_in_threes(path: Path) -> Path:
    """y = a // b on int64 [n, 2], through a Reshape to [-1, 6] and back: ``b = 0`` fails (the
    client's values), and so does any batch that is not a multiple of 3 rows."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Div", ["a", "b"], ["q"]),
            helper.make_node("Reshape", ["q", "wide"], ["t"]),
            helper.make_node("Reshape", ["t", "back"], ["y"]),
        ],
        "divide_in_threes",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 2])],
        [
            numpy_helper.from_array(np.array([-1, 6], np.int64), "wide"),
            numpy_helper.from_array(np.array([-1, 2], np.int64), "back"),
        ],
    )
    return _save(graph, path)
