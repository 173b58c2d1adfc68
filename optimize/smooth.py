"""SmoothQuant-style smoothing: move activation outliers into the weights before int8.

Transformers' activations have a few channels tens of times larger than the rest (the inputs of
the attention and feed-forward projections); int8 with one scale per tensor gives every other
channel a handful of levels. For a MatMul ``X @ W`` with a constant ``W`` the product is the same
for ``(X / s) @ (s W)`` with one ``s`` per input channel, and ``s_j = max|X_j|^a / max|W_j|^(1-a)``
(Xiao et al., 2023) evens the channels of ``X`` at the price of unevening the rows of ``W``,
which per-channel weights absorb. A ``Mul`` by ``1 / s`` goes before the MatMuls that share an
input; their weights are scaled. The float model is the same function, so it is a base like any
other: its int8 candidates are verified on the held-back data.

ONNX Runtime's static quantizer has ``SmoothQuant`` too, but it needs neural-compressor 2.x's
ONNX adaptor and smooths static QDQ only; this pass works for dynamic int8 as well.

The strength ``a`` depends on the model; ``Search.smoothed`` picks it on the calibration rows by
the deciding metric after dynamic int8, never on the held-back rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from optimize.data import Dataset
from optimize.passes import PassConfig

ALPHAS = (0.5, 0.6, 0.7, 0.8)  # the coarse grid; the best is refined by STEP either side
STEP = 0.05
SUFFIX = "__smooth"


# Where transformers' outlier channels come from: a normalization's per-channel scale.
NORMS = frozenset(
    {
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
    }
)


class SmoothConfig(PassConfig):
    alpha: float  # 0: no smoothing, 1: every activation channel brought to the same range
    # "normalized": only the MatMuls fed by a normalization (the outliers' source, and the
    # cheapest: their Mul is on the narrow hidden size); "all": every MatMul with a weight.
    scope: Literal["normalized", "all"] = "normalized"
    calibration_rows: int = 64


def groups(proto: Any, scope: str = "all") -> dict[str, list[Any]]:
    """Activation tensor -> the MatMuls that multiply it by a constant 2-D float weight."""
    weights = {i.name: i for i in proto.graph.initializer}
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    found: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[0] in weights:
            continue
        weight = weights.get(node.input[1])
        if scope == "normalized" and producers.get(node.input[0]) not in NORMS:
            continue
        if weight is not None and len(weight.dims) == 2 and weight.data_type == 1:
            found.setdefault(node.input[0], []).append(node)
    return found


def channel_max(model: Path, tensors: Iterable[str], data: Dataset, rows: int) -> dict[str, Any]:
    """The largest magnitude of each channel (last axis) of ``tensors`` on calibration rows."""
    import onnx

    from optimize.sensitivity import tap

    wanted = sorted(set(tensors))
    predictor = tap(onnx.load(str(model)), wanted)
    found: dict[str, Any] = {}
    for feed in data.take(slice(0, rows)).batches(8):
        values = predictor.run(feed, validate=False)
        for name in wanted:
            value = np.abs(np.asarray(values[name], dtype=np.float32))
            peak = value.reshape(-1, value.shape[-1]).max(axis=0)
            found[name] = np.maximum(found[name], peak) if name in found else peak
    return found


def scales(activation: Any, weights: Sequence[Any], alpha: float) -> Any:
    """One factor per input channel; channels never seen non-zero are left alone."""
    w = np.max([np.abs(x).max(axis=1) for x in weights], axis=0)
    a = np.asarray(activation, dtype=np.float64)
    found = a**alpha / np.maximum(w, 1e-8) ** (1 - alpha)
    found = np.where((a > 0) & (w > 0) & np.isfinite(found) & (found > 0), found, 1.0)
    return np.clip(found, 1e-4, 1e4).astype(np.float32)


def smooth_with(data: Dataset) -> Callable[[Path, Path, SmoothConfig], None]:
    """The transform for ``Runner.run``: statistics come from ``data``'s first rows."""

    def smooth(src: Path, dst: Path, config: SmoothConfig) -> None:
        import onnx
        from onnx import helper, numpy_helper

        proto = onnx.load(str(src))
        found = groups(proto, config.scope)
        if not found:
            raise ValueError("no MatMul with a constant weight to smooth")
        peaks = channel_max(src, found, data, config.calibration_rows)
        weights = {i.name: i for i in proto.graph.initializer}
        muls: dict[str, Any] = {}
        for tensor, users in found.items():
            arrays = [numpy_helper.to_array(weights[u.input[1]]) for u in users]
            factor = scales(peaks[tensor], arrays, config.alpha)
            if factor.shape[0] != arrays[0].shape[0]:
                continue  # a broadcast MatMul whose channels are not the weight's rows
            for user, array in zip(users, arrays, strict=True):
                name = f"{user.input[1]}{SUFFIX}_{user.name or len(muls)}"
                proto.graph.initializer.append(
                    numpy_helper.from_array((array * factor[:, None]).astype(np.float32), name)
                )
                user.input[1] = name
            if _fold(proto, tensor, users, factor):
                continue
            inverse = numpy_helper.from_array((1.0 / factor).astype(np.float32), tensor + SUFFIX)
            proto.graph.initializer.append(inverse)
            muls[tensor] = helper.make_node(
                "Mul", [tensor, inverse.name], [f"{tensor}{SUFFIX}_x"], name=f"{tensor}{SUFFIX}"
            )
            for user in users:
                user.input[0] = f"{tensor}{SUFFIX}_x"
        _place(proto.graph, muls)
        # Weights no node reads any more (the unscaled ones) go, so the size stays the same.
        used = {name for node in proto.graph.node for name in node.input}
        kept = [i for i in proto.graph.initializer if i.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        onnx.save(proto, str(dst))

    return smooth


def _fold(proto: Any, tensor: str, users: list[Any], factor: Any) -> bool:
    """Divide a LayerNormalization's scale and bias by ``factor`` instead of adding a Mul,
    where the smoothed MatMuls are the only readers of its output (pre-norm transformers)."""
    from onnx import numpy_helper

    readers = [n for n in proto.graph.node if tensor in n.input]
    producer = next((n for n in proto.graph.node if tensor in n.output), None)
    weights = {i.name: i for i in proto.graph.initializer}
    if (
        producer is None
        or producer.op_type != "LayerNormalization"
        or list(producer.output[:1]) != [tensor]
        or len(readers) != len(users)
        or tensor in {o.name for o in proto.graph.output}
        or not all(name in weights for name in producer.input[1:3] if name)
    ):
        return False
    for position, name in enumerate(producer.input[1:3], start=1):
        if not name:
            continue
        scaled = numpy_helper.to_array(weights[name]) / factor
        new = f"{name}{SUFFIX}_{producer.name or tensor}"
        proto.graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), new))
        producer.input[position] = new
    return True


def _place(graph: Any, muls: dict[str, Any]) -> None:
    """Each Mul right after what makes its input, so the graph stays in topological order."""
    inputs = {i.name for i in graph.input}
    nodes = [muls[t] for t in muls if t in inputs]
    for node in graph.node:
        nodes.append(node)
        nodes += [muls[o] for o in node.output if o in muls]
    del graph.node[:]
    graph.node.extend(nodes)


def best_alpha(score: Callable[[float], float | None], alphas: Sequence[float] = ALPHAS) -> float:
    """The strength with the best score on a coarse grid, then ``STEP`` either side of it.
    ``score`` returns None when it could not run (the deadline): the best so far stands."""
    seen: dict[float, float] = {}

    def tried(alpha: float) -> bool:
        alpha = round(alpha, 3)
        if alpha in seen or not 0 < alpha < 1:
            return True
        found = score(alpha)
        if found is None:
            return False
        seen[alpha] = found
        return True

    for alpha in alphas:
        if not tried(alpha):
            break
    else:
        top = max(seen, key=lambda a: seen[a])
        for alpha in (top - STEP, top + STEP):
            if not tried(alpha):
                break
    if not seen:
        raise ValueError("no smoothing strength could be measured")
    return max(seen, key=lambda a: seen[a])
