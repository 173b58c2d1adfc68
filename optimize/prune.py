"""Structured pruning of ONNX graphs: remove hidden units and channels, so FLOPs really drop.

Zeros inside a dense weight give ONNX Runtime no speed; removing a unit does. Between two
layers joined by an elementwise activation (MatMul/Gemm → [Add] → act → MatMul/Gemm, or
Conv → act/pool → Conv), the units with the least importance are cut from the first layer's
outputs and the second layer's inputs. Importance is the unit's mean absolute activation on
calibration data times the norm of its outgoing weights (the weight norms alone without data),
and what the removed units contributed on average is folded into the next layer's bias.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpack import Predictor, PredictorOptions, TensorSpec
from optimize.data import Dataset
from optimize.passes import PassConfig

# Ops that act on each unit (channel) alone, so a unit can be removed through them.
ELEMENTWISE = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
}
CHANNELWISE = ELEMENTWISE | {"MaxPool", "AveragePool"}


class PruneConfig(PassConfig):
    ratio: float  # share of the hidden units / channels to remove
    round_to: int = 8  # kept units rounded up to a multiple, for SIMD-friendly shapes


@dataclass(frozen=True)
class Pair:
    """Two layers with prunable units between them."""

    first: Any  # NodeProto
    bias_add: Any | None  # Add after a MatMul, holding the first layer's bias
    hidden: str  # tensor between the activation and the second layer
    second: Any
    conv: bool


def _consumers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _attr(node: Any, name: str, default: int = 0) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _single(consumers: dict[str, list[Any]], tensor: str, outputs: set[str]) -> Any | None:
    users = consumers.get(tensor, [])
    return users[0] if len(users) == 1 and tensor not in outputs else None


def find_pairs(graph: Any, weights: dict[str, np.ndarray]) -> list[Pair]:
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    uses = {name: len(users) for name, users in consumers.items()}
    pairs = []
    for node in graph.node:
        conv = node.op_type == "Conv"
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        if w is None or uses.get(node.input[1], 0) != 1 or (conv and _attr(node, "group", 1) != 1):
            continue
        if not conv and (w.ndim != 2 or _attr(node, "transA")):
            continue
        tensor, bias_add = node.output[0], None
        nxt = _single(consumers, tensor, outputs)
        if not conv and nxt is not None and nxt.op_type == "Add":
            other = [x for x in nxt.input if x != tensor]
            if (
                len(other) == 1
                and other[0] in weights
                and weights[other[0]].ndim == 1
                and uses[other[0]] == 1
            ):
                bias_add, tensor = nxt, nxt.output[0]
                nxt = _single(consumers, tensor, outputs)
        allowed = CHANNELWISE if conv else ELEMENTWISE
        seen_act = False
        while nxt is not None and nxt.op_type in allowed and len(nxt.input) == 1:
            tensor, seen_act = nxt.output[0], True
            nxt = _single(consumers, tensor, outputs)
        if nxt is None or not seen_act or nxt.op_type != node.op_type or nxt.input[0] != tensor:
            continue
        w2 = weights.get(nxt.input[1])
        if w2 is None or uses.get(nxt.input[1], 0) != 1:
            continue
        if conv and _attr(nxt, "group", 1) != 1:
            continue
        if not conv and (w2.ndim != 2 or _attr(nxt, "transA")):
            continue
        pairs.append(Pair(node, bias_add, tensor, nxt, conv))
    return pairs


def _out_axis(node: Any) -> int:
    """Axis of the first layer's weight that holds its output units."""
    if node.op_type == "Conv":
        return 0
    return 0 if node.op_type == "Gemm" and _attr(node, "transB") else 1


def _in_axis(node: Any) -> int:
    """Axis of the second layer's weight that holds its input units."""
    if node.op_type == "Conv":
        return 1
    return 1 if node.op_type == "Gemm" and _attr(node, "transB") else 0


def _activations(
    model: Path, pairs: list[Pair], data: Dataset, rows: int = 256
) -> dict[str, np.ndarray]:
    import onnx

    proto = onnx.load(str(model))
    names = [p.hidden for p in pairs]
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    predictor = Predictor(
        proto.SerializeToString(),
        [],
        [TensorSpec(name=n, dtype="float32") for n in names],
        PredictorOptions(warmup=False, graph_optimization="disabled"),
    )
    return predictor.run(data.take(slice(0, rows)).inputs, validate=False)


def _next_bias(
    pair: Pair, weights: dict[str, np.ndarray], consumers: dict[str, list[Any]]
) -> str | None:
    second = pair.second
    if second.op_type in ("Gemm", "Conv") and len(second.input) >= 3 and second.input[2] in weights:
        return str(second.input[2])
    users = consumers.get(second.output[0], [])
    if second.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add":
        other = [x for x in users[0].input if x != second.output[0]]
        if len(other) == 1 and other[0] in weights and weights[other[0]].ndim == 1:
            return str(other[0])
    return None


def prune_with(data: Dataset | None) -> Any:
    """The transform for ``Runner.run``; importance uses ``data`` when there is some."""

    def prune(src: Path, dst: Path, config: PruneConfig) -> None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(src))
        graph = model.graph
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        pairs = find_pairs(graph, weights)
        if not pairs:
            raise ValueError("no prunable layer pair (MatMul/Gemm or Conv joined by an activation)")
        acts = _activations(src, pairs, data) if data is not None else {}
        consumers = _consumers(graph)
        for pair in pairs:
            w1, w2 = weights[pair.first.input[1]], weights[pair.second.input[1]]
            out_ax, in_ax = _out_axis(pair.first), _in_axis(pair.second)
            units = w1.shape[out_ax]
            keep_n = min(
                units,
                max(1, math.ceil(units * (1 - config.ratio) / config.round_to) * config.round_to),
            )
            if keep_n >= units:
                continue
            outgoing = np.linalg.norm(np.moveaxis(w2, in_ax, 0).reshape(units, -1), axis=1)
            act = acts.get(pair.hidden)
            if act is not None:
                axes = tuple(i for i in range(act.ndim) if i != (1 if pair.conv else act.ndim - 1))
                mean_act = act.mean(axis=axes)
                importance = np.abs(act).mean(axis=axes) * outgoing
            else:
                mean_act = None
                incoming = np.linalg.norm(np.moveaxis(w1, out_ax, 0).reshape(units, -1), axis=1)
                importance = incoming * outgoing
            keep = np.sort(np.argsort(importance)[::-1][:keep_n])
            drop = np.setdiff1d(np.arange(units), keep)
            bias_name = _next_bias(pair, weights, consumers)
            if mean_act is not None and bias_name is not None:
                # What the removed units gave on average goes into the next layer's bias.
                lost = np.moveaxis(w2, in_ax, -1)[..., drop] @ mean_act[drop]
                lost = lost.reshape(lost.shape[0], -1).sum(axis=1) if pair.conv else lost
                weights[bias_name] = (weights[bias_name] + lost).astype(weights[bias_name].dtype)
            weights[pair.first.input[1]] = np.take(w1, keep, axis=out_ax)
            weights[pair.second.input[1]] = np.take(w2, keep, axis=in_ax)
            bias1 = (
                pair.first.input[2]
                if len(pair.first.input) >= 3 and pair.first.input[2] in weights
                else next((x for x in pair.bias_add.input if x in weights), None)
                if pair.bias_add is not None
                else None
            )
            if bias1:
                weights[bias1] = weights[bias1][keep]
        del graph.initializer[:]
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
        del graph.value_info[:]  # hidden shapes changed; inference below recomputes them
        with contextlib.suppress(Exception):  # shapes are optional; ORT infers its own
            model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(dst))

    return prune
