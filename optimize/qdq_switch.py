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


def _owners(graph: Any, sources: dict[str, str]) -> dict[str, list[str]]:
    """For each DequantizeLinear output, the nodes whose exclusion it depends on.

    ORT's QDQ quantizer quantizes a tensor when its producer or any consumer is quantized, so
    a tensor stays float only once all of them are excluded; a weight belongs to its users.
    """
    producers = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in QDQ and node.name:
            for name in node.input:
                if name in sources:
                    users.setdefault(name, []).append(node.name)
    outputs = {o.name for o in graph.output}
    found = {}
    for dq in sources:
        if dq not in users and dq not in outputs:
            continue
        owners = list(dict.fromkeys(users.get(dq, [])))
        quantize = next((n for n in graph.node if dq in n.output), None)
        q = producers.get(quantize.input[0]) if quantize is not None else None
        producer = producers.get(q.input[0]) if q is not None and q.op_type in QDQ else None
        if producer is not None and producer.op_type not in QDQ and producer.name:
            owners.append(producer.name)
        if owners:
            found[dq] = list(dict.fromkeys(owners))
    return found


def build(qdq: Path, fp32: Path) -> Switchable:
    """Flag i says whether node i (named as in the model quantized) stays quantized, with
    ORT's semantics of ``nodes_to_exclude``: see ``_owners``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(qdq))
    graph = proto.graph
    reference = onnx.load(str(fp32)).graph
    originals = {i.name: i for i in reference.initializer}
    sources, needed, restore = _float_sources(graph, reference)
    present = {i.name for i in graph.initializer}
    constants = {name for node in restore.values() for name in node.input[1:] if name}
    extra: list[Any] = [
        numpy_helper.from_array(numpy_helper.to_array(originals[name]), name + FLOAT)
        for name in sorted(needed)
    ] + [originals[name] for name in sorted(constants - present) if name in originals]
    owners = _owners(graph, sources)
    names = list(dict.fromkeys(n for group in owners.values() for n in group))
    index = {name: i for i, name in enumerate(names)}
    costs = [1.0] * len(names)
    head: list[Any] = []
    for i in index.values():
        extra.append(numpy_helper.from_array(np.array(i, np.int64), f"{FLAGS}_{i}_i"))
        head.append(helper.make_node("Gather", [FLAGS, f"{FLAGS}_{i}_i"], [f"{FLAGS}_{i}"]))
    nodes: list[Any] = []
    switched: dict[str, str] = {}
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        for p, name in enumerate(node.input):
            if name in switched:
                node.input[p] = switched[name]
        nodes.append(node)
        if node.op_type != "DequantizeLinear" or node.output[0] not in owners:
            continue
        dq, source = node.output[0], sources[node.output[0]]
        if source in restore:  # the folded Relu/Clip, before the switch that needs it
            nodes.append(restore.pop(source))
        weight = originals.get(source.removesuffix(FLOAT))
        flags = [f"{FLAGS}_{index[n]}" for n in owners[dq]]
        if source.endswith(FLOAT) and weight is not None:
            for n in owners[dq]:
                costs[index[n]] = max(costs[index[n]], float(np.prod(weight.dims)))
        condition = flags[0]
        for k, other in enumerate(flags[1:]):
            nodes.append(helper.make_node("Or", [condition, other], [f"{dq}__any_{k}"]))
            condition = f"{dq}__any_{k}"
        if dq in outputs:  # the graph output keeps its name: the switch takes it over
            node.output[0] = f"{dq}__dq"
            nodes.append(helper.make_node("Where", [condition, f"{dq}__dq", source], [dq]))
        else:
            nodes.append(helper.make_node("Where", [condition, dq, source], [f"{dq}__switched"]))
            switched[dq] = f"{dq}__switched"
    del graph.node[:]
    graph.node.extend(head + nodes)
    graph.initializer.extend(extra)
    graph.input.append(helper.make_tensor_value_info(FLAGS, TensorProto.BOOL, [len(names)]))
    del graph.value_info[:]
    return Switchable(proto.SerializeToString(), tuple(names), tuple(costs))
