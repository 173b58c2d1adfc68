"""The switchable graph for static QDQ, built from the quantized model itself.

A static QDQ model holds every quantized tensor twice over already: ``t -> QuantizeLinear ->
DequantizeLinear -> consumers``, and weights as ``W_quantized -> DequantizeLinear``. Giving each
consumer node a ``Where`` between the dequantized tensor and its float source (the input of the
QuantizeLinear, or the FP32 weight) switches that node's int8 on and off with the calibrator's
own scales, outputs included. On this CPU the fused int8 kernels give the same figures as the
unfused QDQ graph (measured on PP-OCR), so the simulation is the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optimize.sensitivity import FLAGS, Switchable

QDQ = ("QuantizeLinear", "DequantizeLinear")
SUFFIX = "_quantized"


def _float_sources(graph: Any, fp32: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """DequantizeLinear output -> the float tensor it stands for; FP32 weights to add."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    found: dict[str, str] = {}
    weights: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        producer = producers.get(source)
        if producer is not None and producer.op_type == "QuantizeLinear":
            found[node.output[0]] = producer.input[0]
        elif source in initializers and source.endswith(SUFFIX) and source[: -len(SUFFIX)] in fp32:
            found[node.output[0]] = source[: -len(SUFFIX)]
            weights.add(source[: -len(SUFFIX)])
    return found, weights


def build(qdq: Path, fp32: Path) -> Switchable:
    """Flag i switches int8 on for the inputs of node i (named as in the model quantized)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(qdq))
    graph = proto.graph
    originals = {i.name: i for i in onnx.load(str(fp32)).graph.initializer}
    sources, needed = _float_sources(graph, originals)
    nodes: list[Any] = []
    names: list[str] = []
    costs: list[float] = []
    present = {i.name for i in graph.initializer}
    extra: list[Any] = [originals[name] for name in sorted(needed - present)]
    for node in list(graph.node):
        slots = [p for p, name in enumerate(node.input) if name in sources]
        if node.op_type in QDQ or not slots or not node.name:
            nodes.append(node)
            continue
        index = len(names)
        flag = f"{FLAGS}_{index}"
        extra.append(numpy_helper.from_array(np.array(index, np.int64), f"{flag}_i"))
        nodes.append(helper.make_node("Gather", [FLAGS, f"{flag}_i"], [flag], axis=0))
        cost = 1.0
        for p in slots:
            quantized, source = node.input[p], sources[node.input[p]]
            if source in originals:
                cost = max(cost, float(np.prod(originals[source].dims)))
            chosen = f"{quantized}__as_{index}_{p}"
            nodes.append(helper.make_node("Where", [flag, quantized, source], [chosen]))
            node.input[p] = chosen
        names.append(node.name)
        costs.append(cost)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    graph.input.append(helper.make_tensor_value_info(FLAGS, TensorProto.BOOL, [len(names)]))
    del graph.value_info[:]
    return Switchable(proto.SerializeToString(), tuple(names), tuple(costs))
