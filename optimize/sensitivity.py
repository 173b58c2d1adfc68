"""Per-node quantization error, to find the few nodes worth keeping in float.

One FP32 run captures the inputs of every MatMul/Gemm; each node's int8 product is then
simulated in numpy (activations uint8 asymmetric per tensor as ORT's dynamic quantizer does,
weights int8 symmetric, per channel when asked) and compared with the float product. The ranking
is what matters: the nodes with the largest relative error are the ones to exclude first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpack import Predictor, PredictorOptions, TensorSpec
from optimize.data import Dataset

TARGET_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class NodeError:
    node: str
    op_type: str
    relative_error: float


def _fake_quant_activation(x: np.ndarray, reduce_range: bool) -> np.ndarray:
    levels = 127 if reduce_range else 255
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / levels or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, levels) - zero) * scale


def _fake_quant_weight(w: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    levels = 63 if reduce_range else 127
    axis = tuple(range(w.ndim - 1)) if per_channel and w.ndim >= 2 else None
    scale = np.abs(w).max(axis=axis, keepdims=axis is not None) / levels
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(w / scale), -levels, levels) * scale


def _channel_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean over output channels of the relative error: a channel that int8 wipes out counts
    fully even when a large neighbour dominates the tensor's norm."""
    cols = exact.shape[-1]
    exact, approx = exact.reshape(-1, cols), approx.reshape(-1, cols)
    norms = np.linalg.norm(exact, axis=0)
    errors = np.linalg.norm(approx - exact, axis=0) / np.where(norms == 0, 1.0, norms)
    return float(errors.mean())


def _operands(node: object, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a, b = (values[name] for name in node.input[:2])  # type: ignore[attr-defined]
    if node.op_type == "Gemm":  # type: ignore[attr-defined]
        attrs = {x.name: x.i for x in node.attribute}  # type: ignore[attr-defined]
        a = a.T if attrs.get("transA") else a
        b = b.T if attrs.get("transB") else b
    return a, b


def node_errors(
    model: Path, data: Dataset, *, per_channel: bool, reduce_range: bool, rows: int = 8
) -> list[NodeError]:
    """Every MatMul/Gemm node, most sensitive first."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = [
        n for n in proto.graph.node if n.op_type in TARGET_OPS and len(n.input) >= 2 and n.name
    ]
    wanted = sorted({x for n in nodes for x in n.input[:2] if x not in constants})
    known = {o.name for o in proto.graph.output}
    for name in wanted:
        if name not in known:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    # Fusions would rename or remove the tensors we read.
    predictor = Predictor(
        proto.SerializeToString(),
        [],
        [TensorSpec(name=n, dtype="float32") for n in wanted],
        PredictorOptions(warmup=False, graph_optimization="disabled"),
    )
    feed = data.take(slice(0, rows)).inputs
    values = predictor.run(feed, validate=False) | constants
    found = []
    for node in nodes:
        a, b = _operands(node, values)
        if a.dtype.kind != "f" or b.dtype.kind != "f":
            continue
        exact = np.matmul(a, b)
        b_q = (
            _fake_quant_weight(b, per_channel, reduce_range)
            if node.input[1] in constants
            else _fake_quant_activation(b, reduce_range)
        )
        approx = np.matmul(_fake_quant_activation(a, reduce_range), b_q)
        found.append(NodeError(node.name, node.op_type, _channel_error(exact, approx)))
    return sorted(found, key=lambda e: e.relative_error, reverse=True)
