"""Per-batch sequence padding: pad a batch only to its longest member, cut answers back.

The manifest's ``sequence`` entries name the inputs whose ``axis`` holds a variable-length
sequence. Every input and output that carries the same symbolic dim on some axis (the attention
mask, token type ids, per-token outputs) is padded or cut along with it, so a manifest only has
to name the token input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modelpack.errors import InputError, ManifestError
from modelpack.manifest import Manifest, TensorSpec


@dataclass(frozen=True)
class SequenceAxis:
    """Where the sequence dim sits in each input and output, and what to pad inputs with."""

    inputs: dict[str, int]  # input name -> axis
    pad_values: dict[str, float]  # input name -> pad value (0 for masks and the rest)
    outputs: dict[str, int]  # output name -> axis


def _axes_with(specs: Sequence[TensorSpec], symbol: str) -> dict[str, int]:
    found = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape or []):
            if dim == symbol and axis > 0:
                found[spec.name] = axis
                break
    return found


def sequence_axis(manifest: Manifest) -> SequenceAxis | None:
    """The padding plan of a manifest, or None when it declares no sequence input."""
    if not manifest.sequence:
        return None
    specs = {s.name: s for s in manifest.inputs}
    inputs: dict[str, int] = {}
    pads: dict[str, float] = {}
    outputs: dict[str, int] = {}
    for seq in manifest.sequence:
        spec = specs.get(seq.input)
        if spec is None or not spec.shape or seq.axis >= len(spec.shape) or seq.axis < 1:
            raise ManifestError(f"sequence input {seq.input!r} has no axis {seq.axis}")
        symbol = spec.shape[seq.axis]
        if isinstance(symbol, str):
            inputs.update(_axes_with(manifest.inputs, symbol))
            outputs.update(_axes_with(manifest.outputs, symbol))
        inputs[seq.input] = seq.axis
        pads[seq.input] = seq.pad_value
        if seq.mask_input is not None:
            inputs[seq.mask_input] = seq.axis
            pads[seq.mask_input] = 0
        for name in seq.outputs:
            outputs[name] = seq.axis
    return SequenceAxis(
        inputs=inputs, pad_values={n: pads.get(n, 0) for n in inputs}, outputs=outputs
    )


def check_lengths(feed: Mapping[str, np.ndarray], plan: SequenceAxis) -> None:
    """Every padded input of one request is as long as the others along its sequence axis.
    Exporters name each dim differently (``unk__2``, ``unk__4``), so the symbol check does not
    catch an ``attention_mask`` of 1 beside ``input_ids`` of 5: alone, the model broadcasts
    the mask; batched, it would be padded with zeros, and the same request got another answer."""
    lengths = {name: int(feed[name].shape[axis]) for name, axis in plan.inputs.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{n}: {length}" for n, length in lengths.items())
        raise InputError(
            f"the sequence inputs of one request must be equally long ({listed})",
            reason="shape",
        )


def request_length(feed: Mapping[str, np.ndarray], plan: SequenceAxis) -> int:
    name, axis = next(iter(plan.inputs.items()))
    return int(feed[name].shape[axis])


def pad_to(array: np.ndarray, axis: int, length: int, value: float) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return np.pad(array, widths, constant_values=np.asarray(value, dtype=array.dtype))


def pad_feeds(
    feeds: Sequence[Mapping[str, np.ndarray]], plan: SequenceAxis
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Pad each request's sequence inputs to the longest in the batch; return their lengths."""
    lengths = [request_length(f, plan) for f in feeds]
    longest = max(lengths)
    padded = [
        {
            name: pad_to(array, plan.inputs[name], longest, plan.pad_values[name])
            if name in plan.inputs
            else array
            for name, array in feed.items()
        }
        for feed in feeds
    ]
    return padded, lengths


def cut_outputs(
    outputs: Mapping[str, np.ndarray], length: int, plan: SequenceAxis
) -> dict[str, np.ndarray]:
    """One request's outputs cut back to its own length along the sequence axis."""
    cut = {}
    for name, array in outputs.items():
        axis = plan.outputs.get(name)
        if axis is not None and array.ndim > axis:
            index = [slice(None)] * array.ndim
            index[axis] = slice(0, length)
            array = array[tuple(index)]
        cut[name] = array
    return cut


def split_by_length(lengths: Sequence[int], run_cost_tokens: int = 32) -> list[list[int]]:
    """Split one batch into runs of similar length, cheapest in padded tokens.

    A run costs ``run_cost_tokens`` (ORT's fixed cost per call, in token-equivalents) plus its
    size times its longest member. Sorted by length, the best split is a set of contiguous
    ranges, found exactly by dynamic programming (a batch is at most a few hundred requests).
    Returns groups of indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sorted requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + run_cost_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
