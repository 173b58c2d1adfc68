"""Small ONNX models for the serving core's tests and benchmarks, built in code."""

from __future__ import annotations

import math
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


def conv_chain(
    path: Path, width: int = 256, depth: int = 32, channels: int = 32, seed: int = 0
) -> Path:
    """x[batch, width] seen as a ``sqrt(width)``-square image through ``depth`` 3x3 Conv+Tanh
    of ``channels``, then averaged: y[batch, channels]. Its cost is compute (a 3x3 conv reuses
    each weight at every pixel), not memory: its weights, about 37 KB a layer, stay in the
    core's caches, where a MatMul chain of the same time at batch 1 streams all its weights
    from memory on every request (``slow``: 256 KB a layer), and so runs as fast as the other
    cores let the memory bus be."""
    from onnx import TensorProto, helper, numpy_helper

    side = math.isqrt(width)
    if side * side != width:
        raise ValueError(f"width {width} is not a square")
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([-1, 1, side, side], np.int64), "image")]
    nodes = [helper.make_node("Reshape", ["x", "image"], ["h0"])]
    last, inputs = "h0", 1
    for i in range(depth):
        w = (rng.standard_normal((channels, inputs, 3, 3)) / np.sqrt(inputs * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [last, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Tanh", [f"c{i}"], [f"h{i + 1}"]))
        last, inputs = f"h{i + 1}", channels
    nodes.append(helper.make_node("ReduceMean", [last], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "conv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels])],
        inits,
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


def mixed(path: Path) -> Path:
    """Other dtypes and shapes than the float MLP: ``ids`` int64 [batch, s] through an
    embedding (ids past the table are the client's fault), ``x`` float32 [batch, n] reshaped to
    [batch, 2, n/2] and answered as float64 (an odd ``n`` fails inside ONNX Runtime with FAIL,
    not INVALID_ARGUMENT), and ``total``, the sum of all of ``x``: a scalar with no batch axis.
    Its warmup (every symbolic dim 1) fails, as real models' sometimes do."""
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [5, 2], [float(i) for i in range(10)])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 2, -1])
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Cast", ["r"], ["half"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "s"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"]),
        ],
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "s", 2]),
            helper.make_tensor_value_info("half", TensorProto.DOUBLE, ["batch", 2, "h"]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
        [table, shape],
    )
    return _save(graph, path)


def mixed_reference(ids: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """What ``mixed`` answers, in numpy."""
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    return {
        "emb": table[ids],
        "half": x.reshape(x.shape[0], 2, -1).astype(np.float64),
        "total": np.asarray(x.sum(), np.float32),
    }


def tokens(path: Path, mask: bool = True) -> Path:
    """Token embeddings as tf2onnx exports them: ``input_ids`` and ``attention_mask`` int64
    with a different symbol on every dim, ``hidden`` [batch, seq, 4] = embedding x mask (a
    mask of length 1 broadcasts), and ``pooled``, the masked mean over the sequence. Without
    ``mask`` the model has only ``input_ids`` and ``pooled`` is a plain mean, which padding
    changes."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["unk__1", "unk__2"])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"])]
    inputs = [ids]
    if mask:
        inputs.append(
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["unk__3", "unk__4"])
        )
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
            helper.make_node("Mul", ["emb", "mask3"], ["hidden"]),
            helper.make_node("ReduceSum", ["hidden", "one"], ["total"], keepdims=0),
            helper.make_node("ReduceSum", ["maskf", "one"], ["count"], keepdims=1),
            helper.make_node("Div", ["total", "count"], ["pooled"]),  # the masked mean
        ]
    else:
        nodes += [
            helper.make_node("Identity", ["emb"], ["hidden"]),
            helper.make_node("ReduceMean", ["hidden"], ["pooled"], axes=[1], keepdims=0),
        ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        inputs,
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["unk__5", "unk__6", 4]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["unk__7", 4]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            helper.make_tensor("last", TensorProto.INT64, [1], [2]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ],
    )
    return _save(graph, path)
