"""Tiny ONNX models built in code, so no test needs a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mlp(
    path: Path, n_in: int = 8, hidden: int = 16, n_out: int = 3, seed: int = 0, opset: int = 17
) -> Path:
    """x[batch, n_in] -> MatMul/Add/Relu -> MatMul/Add -> logits[batch, n_out], Softmax -> probs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_in, hidden)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, n_out)).astype(np.float32) * 0.5
    b2 = rng.standard_normal(n_out).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_out]),
        ],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def two_inputs(path: Path) -> Path:
    """a[batch, 4] float32 and k[batch, 1] int64 -> y[batch, 4] = a * k (casts k)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["a", "kf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def golden_samples(model: Path, n: int = 4, n_in: int = 8, seed: int = 1) -> tuple[dict, dict]:
    """Inputs for ``mlp`` and the outputs ONNX Runtime gives on them."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((n, n_in)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {"x": x}, dict(zip(names, session.run(names, {"x": x}), strict=True))
