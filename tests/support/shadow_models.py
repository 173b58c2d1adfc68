"""Models for shadow-rollout tests: ``models.mlp`` made subtly wrong, answering a different top
class for about a tenth of its inputs (those whose first feature is above the standard normal's
90th percentile), and right for the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support import models

FLIP_ABOVE = 1.2816  # P(x > 1.2816) = 0.10 for a standard normal feature


def flipping_mlp(path: Path, share_above: float = FLIP_ABOVE, n_in: int = 8) -> Path:
    """``models.mlp`` whose probabilities (and logits) are rotated one class along wherever
    ``x[:, 0] > share_above``: a different argmax there, the same answers elsewhere."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    base = onnx.load(str(models.mlp(path.with_suffix(".base.onnx"), n_in=n_in)))
    graph = base.graph
    for out in list(graph.output):
        graph.output.remove(out)
    for node in graph.node:  # the originals become internal tensors
        node.output[:] = [f"{o}_base" if o in ("logits", "probs") else o for o in node.output]
        node.input[:] = [f"{i}_base" if i == "logits" else i for i in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray([1, 2, 0], np.int64), "rotate"),
            numpy_helper.from_array(np.asarray([0], np.int64), "first"),
            numpy_helper.from_array(np.asarray(share_above, np.float32), "above"),
        ]
    )
    for name in ("logits", "probs"):
        graph.node.extend(
            [
                helper.make_node("Gather", [f"{name}_base", "rotate"], [f"{name}_rot"], axis=1),
                helper.make_node("Where", ["flip", f"{name}_rot", f"{name}_base"], [name]),
            ]
        )
    graph.node.extend(
        [
            helper.make_node("Gather", ["x", "first"], ["x0"], axis=1),
            helper.make_node("Greater", ["x0", "above"], ["flip"]),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3])
            for n in ("logits", "probs")
        ]
    )
    # Where's nodes read "flip" before it is made: put them in order.
    order = [n for n in graph.node if n.op_type in ("MatMul", "Add", "Relu", "Softmax")]
    tail = [n for n in graph.node if n not in order]
    flips = [n for n in tail if n.op_type in ("Greater",) or list(n.output) == ["x0"]]
    rest = [n for n in tail if n not in flips]
    del graph.node[:]
    graph.node.extend([*order, *flips, *rest])
    onnx.checker.check_model(base)
    onnx.save(base, str(path))
    return path
