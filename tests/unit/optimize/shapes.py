"""Tiny ONNX models with the shapes real-world models have, built in code for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(graph: object, path: Path, opset: int = 17, ir: int = 8) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])  # type: ignore[arg-type]
    model.ir_version = ir
    onnx.save(model, str(path))
    return path


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def wide_mlp(path: Path, n_in: int = 16, hidden: int = 64, n_out: int = 4, opset: int = 17) -> Path:
    """x -> MatMul/Add/Relu -> MatMul/Add/Relu -> MatMul/Add -> logits; half the units idle."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2, w3 = _w(rng, n_in, hidden), _w(rng, hidden, hidden, scale=0.2), _w(rng, hidden, n_out)
    # Units that never fire (negative bias) are what structured pruning should find first.
    b1 = np.where(np.arange(hidden) % 2 == 0, 0.1, -50.0).astype(np.float32)
    b2 = np.zeros(hidden, np.float32)
    b3 = np.zeros(n_out, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "b1"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("MatMul", ["c", "w2"], ["d"]),
        helper.make_node("Add", ["d", "b2"], ["e"]),
        helper.make_node("Relu", ["e"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["g"]),
        helper.make_node("Add", ["g", "b3"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(v, k)
        for k, v in dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3).items()
    ]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    return _save(graph, path, opset=opset, ir=7 if opset < 13 else 8)


def cnn(path: Path, channels: int = 16) -> Path:
    """x[batch,1,8,8] -> Conv/Relu -> Conv/Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = {
        "k1": _w(rng, channels, 1, 3, 3),
        "c1": np.zeros(channels, np.float32),
        "k2": _w(rng, channels, channels, 3, 3, scale=0.2),
        "c2": np.zeros(channels, np.float32),
        "fc": _w(rng, channels, 4),
        "fb": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "k1", "c1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2", "c2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _save(graph, path)


def several_inputs_scalar(path: Path) -> Path:
    """tokens[batch, seq] int64, features[batch, seq, 8], temperature[] (a scalar) -> probs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = {"emb": _w(rng, 16, 8), "w": _w(rng, 8, 4)}
    nodes = [
        helper.make_node("Gather", ["emb", "tokens"], ["e"]),
        helper.make_node("Add", ["e", "features"], ["s"]),
        helper.make_node("MatMul", ["s", "w"], ["l"]),
        helper.make_node("Div", ["l", "temperature"], ["t"]),
        helper.make_node("Softmax", ["t"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "several_inputs",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "seq", 8]),
            helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _save(graph, path)


def recurrent(path: Path, n_in: int = 6, hidden: int = 8) -> Path:
    """An LSTM over x[seq, batch, n_in] with state inputs h0/c0 [1, batch, hidden] and outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = {
        "W": _w(rng, 1, 4 * hidden, n_in),
        "R": _w(rng, 1, 4 * hidden, hidden),
        "B": np.zeros((1, 8 * hidden), np.float32),
    }
    node = helper.make_node(
        "LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "h", "c"], hidden_size=hidden
    )
    graph = helper.make_graph(
        [node],
        "recurrent",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", n_in]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", hidden]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, "batch", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 1, "batch", hidden]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", hidden]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, "batch", hidden]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _save(graph, path)


def bad_shape_info(path: Path) -> Path:
    """A model ONNX Runtime runs but whose stored value_info breaks ONNX shape inference."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bad_shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(_w(rng, 8, 4), "w")],
        # Wrong on purpose: h is [batch, 4], the stored info says [batch, 5].
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 5])],
    )
    return _save(graph, path)


def upsample_opset9(path: Path) -> Path:
    """An opset-9 Conv + Upsample (an op later opsets removed), as old exporters wrote them.

    ORT's Percentile calibrator raises on it: a real quantizer failure for the search to record.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Upsample", ["c", "scales"], ["y"], mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes,
        "upsample",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(_w(rng, 1, 1, 4, 4), "w"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ],
    )
    return _save(graph, path, opset=9, ir=6)


def runtime_expand(path: Path) -> Path:
    """x[batch, 8] -> MatMul -> Expand to a shape given at run time (input ``shape``, int64[2]).

    ORT's symbolic shape inference asserts on an Expand whose shape is only known at run time,
    as it does on many exported transformers: quant_pre_process must be retried without it.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Expand", ["h", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "runtime_expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(_w(rng, 8, 1), "w")],
    )
    return _save(graph, path)


def near_constant(path: Path) -> Path:
    """Conv -> Add 3000 -> Conv: an activation of 3000 +- 1e-3, as saturated real layers give.

    ORT's Percentile calibrator builds float32 histograms and raises on it ("Too many bins for
    data range"), as it did on PP-OCR.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "big"], ["d"], name="shift"),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "near_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [
            numpy_helper.from_array(_w(rng, 2, 1, 3, 3, scale=1e-4), "w"),
            numpy_helper.from_array(np.array(3000.0, np.float32), "big"),
            numpy_helper.from_array(_w(rng, 2, 2, 3, 3, scale=0.1), "w2"),
        ],
    )
    return _save(graph, path)


def fixed_rows(path: Path, rows: int = 8) -> Path:
    """x[batch, 4] declared dynamic, but a Reshape to [rows, 4] inside: only whole feeds run."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Reshape", ["x", "fixed"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 16])],
        [
            numpy_helper.from_array(np.array([rows, 4], np.int64), "fixed"),
            numpy_helper.from_array(_w(rng, 4, 16), "w"),
        ],
    )
    return _save(graph, path)
