"""Node sensitivity, measured with the metric that decides, on a model that switches int8 per node.

One graph holds every quantizable node's inputs twice: as they are, and as int8 would give them
(weights rounded to int8 per channel or per tensor, activations through DynamicQuantizeLinear as
``quantize_dynamic`` does; for static QDQ, ``optimize.qdq_switch`` builds it from the quantized
model itself), joined by a ``Where`` on one flag of an extra boolean input. One session then answers "what does the deciding
metric say with these nodes kept in float" in one run, so ranking every node (all in int8 but one)
and the greedy exclusion that follows cost model runs, not quantizer calls. The real quantizer
then verifies what the simulation proposes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpack import Predictor, PredictorOptions, TensorSpec
from optimize.data import Dataset

FLAGS = "__edgebento_int8"
# Nodes whose inputs the quantizers turn into int8 (for QDQ, the ops its registry covers that
# matter most for accuracy); others pass through in float.
DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "Conv", "Attention", "Gather"})
STATIC_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "Sigmoid",
        "HardSigmoid",
        "Concat",
        "Resize",
        "AveragePool",
        "MaxPool",
        "GlobalAveragePool",
        "Softmax",
        "Relu",
        "Clip",
    }
)
Score = Callable[[Mapping[str, np.ndarray]], float]


@dataclass(frozen=True)
class Switchable:
    model: bytes
    nodes: tuple[str, ...]  # flag i switches int8 on for nodes[i]
    costs: tuple[float, ...] = ()  # what keeping each node in float costs (weight elements)


def _fake_weight(w: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    levels = 63 if reduce_range else 127  # reduce_range: 7-bit weights (no U8S8 saturation)
    if axis is None or w.ndim < 2:
        scale = np.asarray(np.abs(w).max() / levels)
    else:
        other = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
        scale = np.abs(w).max(axis=other, keepdims=True) / levels
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(w / scale), -levels, levels) * scale).astype(w.dtype)


def _channel_axis(node: Any, position: int) -> int | None:
    if position != 1:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return -1  # MatMul, Attention: one scale per output column


def _cost(node: Any, weights: Mapping[str, Any]) -> float:
    """Float work kept by excluding ``node``: its weight's size; a lookup (Gather) costs none."""
    if node.op_type == "Gather":
        return 0.0
    for name in node.input[1:2]:
        if name in weights:
            return float(np.prod(weights[name].dims)) or 1.0
    return 1.0


def _float_inputs(proto: Any) -> set[str]:
    """Tensors known to be float32; unknown ones count as float for the compute ops."""
    known = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    known |= {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
    known |= {i.name: i.data_type for i in proto.graph.initializer}
    return {name for name, kind in known.items() if kind == 1} | {
        name for node in proto.graph.node for name in node.input if name not in known
    }


def _positions(node: Any) -> tuple[int, ...]:
    if node.op_type == "Gather":
        return (0,)
    if node.op_type in ("MatMul", "Gemm", "Conv", "Attention"):
        return (0, 1)
    return ()


def build(
    model: Path, *, per_channel: bool, reduce_range: bool, op_types: Sequence[str] = ()
) -> Switchable:
    """The switchable graph of dynamic quantization; ``op_types`` the quantizer's restriction.

    (Static QDQ is switched on the quantized model itself: ``optimize.qdq_switch``.)"""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(model))
    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    floats = _float_inputs(proto)
    ops = frozenset(op_types) or DYNAMIC_OPS
    nodes: list[Any] = []
    names: list[str] = []
    costs: list[float] = []
    extra: list[Any] = []
    for node in list(graph.node):
        slots = [
            p
            for p in _positions(node)
            if p < len(node.input) and node.input[p] and node.input[p] in floats
        ]
        if node.op_type not in ops or not slots or not node.name:
            nodes.append(node)
            continue
        if node.op_type == "Gather" and node.input[0] not in weights:
            nodes.append(node)
            continue
        if node.op_type in ("MatMul", "Gemm") and node.input[1] not in weights:
            # quantize_dynamic leaves a MatMul of two activations in float (MatMulConstBOnly).
            nodes.append(node)
            continue
        costs.append(_cost(node, weights))
        index = len(names)
        flag = f"{FLAGS}_{index}"
        extra.append(numpy_helper.from_array(np.array(index, np.int64), f"{flag}_i"))
        nodes.append(helper.make_node("Gather", [FLAGS, f"{flag}_i"], [flag], axis=0))
        for p in slots:
            source = node.input[p]
            fake = f"{source}__int8_{index}_{p}"
            if source in weights:
                w = numpy_helper.to_array(weights[source])
                axis = _channel_axis(node, p) if per_channel else None
                extra.append(numpy_helper.from_array(_fake_weight(w, axis, reduce_range), fake))
            else:  # an activation: uint8 per tensor, scaled per batch, as ORT does
                nodes += [
                    helper.make_node(
                        "DynamicQuantizeLinear",
                        [source],
                        [f"{fake}_q", f"{fake}_s", f"{fake}_z"],
                    ),
                    helper.make_node(
                        "DequantizeLinear", [f"{fake}_q", f"{fake}_s", f"{fake}_z"], [fake]
                    ),
                ]
            chosen = f"{source}__as_{index}_{p}"
            nodes.append(helper.make_node("Where", [flag, fake, source], [chosen]))
            node.input[p] = chosen
        names.append(node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    graph.input.append(helper.make_tensor_value_info(FLAGS, TensorProto.BOOL, [len(names)]))
    del graph.value_info[:]  # renamed inputs: stale shapes would only mislead ORT
    return Switchable(proto.SerializeToString(), tuple(names), tuple(costs))


def activation_ranges(
    model: Path, data: Dataset, rows: int = 32, percentile: float | None = None
) -> dict[str, tuple[float, float]]:
    """Range of every float activation that static QDQ quantizes, on calibration rows (the
    calibrators' stand-in when ORT's own fail).

    MinMax by default; with ``percentile`` (99.999: ORT's default) the tails beyond it are cut,
    computed in float64 so that a near-constant tensor cannot break it as it breaks ORT's
    float32 histograms ("Too many bins for data range").
    """
    import onnx

    proto = onnx.load(str(model))
    floats = _float_inputs(proto)
    weights = {i.name for i in proto.graph.initializer}
    wanted = sorted(
        {
            name
            for node in proto.graph.node
            if node.op_type in STATIC_OPS
            for name in [*node.input, *node.output]
            if name and name in floats and name not in weights
        }
        - {o.name for o in proto.graph.output}
        - {i.name for i in proto.graph.input}
    )
    predictor = tap(proto, wanted)
    seen: dict[str, list[np.ndarray]] = {}
    for feed in data.take(slice(0, rows)).batches(8):
        for name, value in predictor.run(feed, validate=False).items():
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.size:
                finite = value[np.isfinite(value)].astype(np.float64)
                if finite.size:
                    seen.setdefault(name, []).append(finite)
    found = {}
    for name, parts in seen.items():
        joined = np.concatenate(parts)
        if percentile is None:
            found[name] = (float(joined.min()), float(joined.max()))
        else:
            lo, hi = np.percentile(joined, [100 - percentile, percentile])
            found[name] = (float(lo), float(hi))
    return found


def tap(proto: Any, names: Sequence[str]) -> Predictor:
    """A session of ``proto`` (changed in place) that answers the tensors ``names``; without
    graph optimization, so that none of them is fused away."""
    import onnx

    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return Predictor(
        proto.SerializeToString(),
        [],
        [TensorSpec(name=n, dtype="float32") for n in names],
        PredictorOptions(warmup=False, graph_optimization="disabled"),
    )


@dataclass(frozen=True)
class Exclusion:
    """The nodes the greedy search kept in float, in the order it accepted them: keeping the
    first k of them in float is the k-th refinement. ``margins[k]`` is the simulated margin with
    those k in float (index 0: every node in int8)."""

    order: tuple[str, ...]
    margins: tuple[float, ...]

    @property
    def start(self) -> int:
        """The fewest nodes the simulation says reach the budget (all of them if none do)."""
        return next((k for k, m in enumerate(self.margins) if k and m >= 0), len(self.order))


def greedy(
    switchable: Switchable,
    score: Callable[[np.ndarray], float],
    deadline: float,
    headroom: float = 0.0,
) -> Exclusion:
    """Rank nodes by what keeping each alone in float gains for what it costs in float work;
    then, in that order, keep a node in float only if the simulated deciding margin improves,
    until the margin reaches ``headroom`` or half of the nodes are float.

    Accepting only what improves matters: the deciding metric is a minimum over rows, and
    a node that helps on its own can make another row the worst one.
    """
    n = len(switchable.nodes)
    every = np.ones(n, dtype=bool)
    base = score(every)
    gains = np.zeros(n)
    for i in range(n):
        if time.monotonic() > deadline:
            break
        flags = every.copy()
        flags[i] = False
        gains[i] = score(flags) - base
    costs = np.asarray(switchable.costs or [1.0] * n, dtype=np.float64)
    # Gain per unit of float work; the cheapest nonzero cost keeps free nodes finite.
    floor = costs[costs > 0].min() / 10 if (costs > 0).any() else 1.0
    value = np.where(gains > 0, gains / np.maximum(costs, floor), gains - 1e9)
    order = [int(i) for i in np.argsort(-value, kind="stable") if gains[i] > 0]
    flags, margins = every.copy(), [base]
    accepted: list[int] = []
    for i in order:
        if (
            margins[-1] >= headroom
            or len(accepted) >= max(1, n // 2)
            or time.monotonic() > deadline
        ):
            break
        flags[i] = False
        found = score(flags)
        if found > margins[-1]:
            accepted.append(i)
            margins.append(found)
        else:
            flags[i] = True
    return Exclusion(tuple(switchable.nodes[j] for j in accepted), tuple(margins))


def shortest_prefix(
    length: int, start: int, passes: Callable[[int], bool | None], tries: int
) -> int | None:
    """A count of an exclusion's first nodes that the real quantizer's model passes with where
    one fewer missed (tries allowing): the fewest when passing grows with the count. At most
    ``tries`` calls of ``passes(k)`` (None: stop, for an error or the deadline).

    The simulation runs on calibration rows and the budget is judged on held-back ones, so its
    count is only where to begin: from ``start`` the count doubles until a model passes, then
    halves the gap to the longest one known to fail. 0 is known to fail (the unrefined
    candidate).
    """
    failed, passed = 0, None
    k = min(max(start, 1), length)
    while tries > 0 and 0 < k <= length:
        tries -= 1
        ok = passes(k)
        if ok is None:
            break
        if ok:
            passed = k
        else:
            failed = k
        if passed is None:
            k = min(2 * k, length) if k < length else 0
        else:
            k = (failed + passed) // 2
            if k <= failed:
                break
    return passed


def scorer(
    switchable: Switchable,
    outputs: Sequence[TensorSpec],
    data: Dataset,
    run: Callable[[Predictor, Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    margin: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float],
    reference: Mapping[str, np.ndarray] | None = None,
) -> Callable[[np.ndarray], float]:
    """``flags -> deciding margin`` against ``reference`` (FP32's outputs on the same rows),
    else against the all-float run of the same graph."""
    predictor = Predictor(switchable.model, [], list(outputs), PredictorOptions(warmup=False))
    if reference is None:
        reference = run(predictor, {FLAGS: np.zeros(len(switchable.nodes), dtype=bool)})

    def score(flags: np.ndarray) -> float:
        return margin(reference, run(predictor, {FLAGS: flags}))

    return score
