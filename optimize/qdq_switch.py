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
# Activations the QDQ quantizer drops when the quantized range already clamps like them.
REMOVABLE = ("Relu", "Clip")
SUFFIX = "_quantized"
FLOAT = "__fp32"


def _float_sources(graph: Any, fp32: Any) -> tuple[dict[str, str], set[str], dict[str, Any]]:
    """DequantizeLinear output -> the float tensor it stands for; the FP32 weights to add; the
    FP32 activations (Relu, Clip) that the quantizer folded into a range, to add back."""
    import onnx

    weights = {i.name for i in fp32.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    present = set(producers) | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    fp32_nodes = {n.name: n for n in fp32.node if n.name}
    fp32_producers = {o: n for n in fp32.node for o in n.output}

    def folded(tensor: str) -> Any | None:
        """The FP32 Relu/Clip that ``tensor`` skipped: the quantizer either renamed the
        producer's output to the activation's, or left the activation's output unused."""
        activation = fp32_producers.get(tensor)
        producer = producers.get(tensor)
        original = fp32_nodes.get(producer.name) if producer is not None else None
        if (
            activation is not None
            and activation.op_type in REMOVABLE
            and original is not None
            and activation is not original
            and activation.input[0] in original.output
        ):
            return activation
        for user in (n for n in fp32.node if tensor in n.input[:1]):
            if user.op_type in REMOVABLE and user.output[0] not in present:
                return user
        return None

    found: dict[str, str] = {}
    needed: set[str] = set()
    restore: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        producer = producers.get(source)
        if producer is not None and producer.op_type == "QuantizeLinear":
            tensor = producer.input[0]
            activation = folded(tensor)
            if activation is not None:  # its range stood for the activation: float needs it
                copy = onnx.NodeProto()
                copy.CopyFrom(activation)
                copy.name, copy.input[0] = f"{activation.name}{FLOAT}", tensor
                del copy.output[:]
                copy.output.append(tensor + FLOAT)
                restore[tensor + FLOAT] = copy
                tensor += FLOAT
            found[node.output[0]] = tensor
        elif source.endswith(SUFFIX) and source[: -len(SUFFIX)] in weights:
            # Under a name of its own: ORT names a bias's DequantizeLinear output as the bias.
            found[node.output[0]] = source[: -len(SUFFIX)] + FLOAT
            needed.add(source[: -len(SUFFIX)])
    return found, needed, restore


def build(qdq: Path, fp32: Path) -> Switchable:
    """Flag i switches int8 on for the inputs of node i (named as in the model quantized)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(qdq))
    graph = proto.graph
    reference = onnx.load(str(fp32)).graph
    originals = {i.name: i for i in reference.initializer}
    sources, needed, restore = _float_sources(graph, reference)
    present = {i.name for i in graph.initializer}
    constants = {name for node in restore.values() for name in node.input[1:] if name}
    nodes: list[Any] = []
    names: list[str] = []
    costs: list[float] = []
    extra: list[Any] = [
        numpy_helper.from_array(numpy_helper.to_array(originals[name]), name + FLOAT)
        for name in sorted(needed)
    ] + [originals[name] for name in sorted(constants - present) if name in originals]
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
            if source in restore:  # the folded Relu/Clip, once, before its first use
                nodes.append(restore.pop(source))
            weight = originals.get(source.removesuffix(FLOAT))
            if source.endswith(FLOAT) and weight is not None:
                cost = max(cost, float(np.prod(weight.dims)))
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
