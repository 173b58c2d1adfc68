"""Each input's batch axis, proven by running the FP32 model on a split of the user's data.

The io signature says where rows lie when the exporter named the batch dim; when it did not
(Silero VAD's ``state [2, ?, 128]`` beside ``input [?, ?]``), the data's sizes give the
candidates and the model decides: a split is kept only when one row and two rows run and the
two rows' outputs are the single rows' outputs joined. Feeds no split passes run whole, never
half-split.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from modelpack import Predictor, TensorSpec
from modelpack.errors import ConfigError, EdgebentoError
from optimize.data import Dataset, batch_axes

MAX_PLANS = 12  # splits tried per dataset: each costs three runs of one or two rows
MAX_CHOICES = 8  # axis combinations per row count (inputs with several free axes of that size)


def free_axes(spec: TensorSpec, array: np.ndarray) -> list[int]:
    """Axes whose size the signature leaves open: only those can count rows."""
    dims = spec.shape
    if array.ndim == 0:
        return []
    if dims is None or len(dims) != array.ndim:
        return list(range(array.ndim))
    return [a for a, d in enumerate(dims) if not isinstance(d, int)]


def plans(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray], label_rows: int | None = None
) -> list[dict[str, int]]:
    """Splits to try, most likely first: the signature's named batch, then for every row count
    the data allows, each input on an open axis of that size (inputs without one go whole)."""
    free = {s.name: free_axes(s, inputs[s.name]) for s in specs}
    counts: Counter[int] = Counter()
    for name, axes in free.items():
        counts.update({int(inputs[name].shape[a]) for a in axes})
    found: list[dict[str, int]] = []
    for rows in counts:
        options = {
            name: [a for a in axes if inputs[name].shape[a] == rows] for name, axes in free.items()
        }
        options = {k: v for k, v in options.items() if v}
        names = sorted(options)
        combos = itertools.islice(itertools.product(*(options[n] for n in names)), MAX_CHOICES)
        found += [dict(zip(names, combo, strict=True)) for combo in combos]

    def rank(plan: dict[str, int]) -> tuple[bool, int, int]:
        # The labels' count first, then splits that cover the most inputs, leading axes first.
        return (_rows(plan, inputs) != label_rows, -len(plan), sum(plan.values()))

    ordered = sorted(found, key=rank)
    named = batch_axes(specs, inputs)
    unique = [named] if named else []
    unique += [p for p in ordered if p not in unique]
    return unique[:MAX_PLANS]


def _rows(plan: Mapping[str, int], inputs: Mapping[str, np.ndarray]) -> int:
    name, axis = next(iter(plan.items()))
    return int(inputs[name].shape[axis])


def _joined_axis(one: np.ndarray, other: np.ndarray, two: np.ndarray) -> int | bool | None:
    """The axis two rows' output joins the single rows' outputs along; None when no axis
    doubles (nothing to check), False when one doubles but the values disagree (rows mixed)."""
    sa, sb = np.shape(one), np.shape(two)
    if len(sa) != len(sb) or np.shape(other) != sa:
        return None
    doubled = [a for a, (x, y) in enumerate(zip(sa, sb, strict=True)) if x > 0 and y == 2 * x]
    for axis in doubled:
        if [d for a, d in enumerate(sa) if a != axis] != [d for a, d in enumerate(sb) if a != axis]:
            continue
        joined = np.concatenate([np.asarray(one), np.asarray(other)], axis=axis)
        if _close(joined, np.asarray(two)):
            return axis
    return False if doubled else None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 1.0
    # One row alone and in a pair of rows run different GEMM blockings: float noise, not mixing.
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6), equal_nan=True))


def proof(predictor: Predictor, data: Dataset) -> dict[str, int] | None:
    """Each output's rows axis when the split ``data.axes`` holds: one and two rows run and
    agree; None when the model refuses the split or its rows come out mixed."""
    try:
        one = predictor.run(data.take(slice(0, 1)).inputs, validate=False)
        other = predictor.run(data.take(slice(1, 2)).inputs, validate=False)
        two = predictor.run(data.take(slice(0, 2)).inputs, validate=False)
    except EdgebentoError:
        return None
    axes: dict[str, int] = {}
    for name, value in two.items():
        axis = _joined_axis(one[name], other[name], value)
        if axis is False:
            return None
        if isinstance(axis, int) and not isinstance(axis, bool):
            axes[name] = axis
    return axes


def settle(
    predictor: Predictor, specs: Sequence[TensorSpec], data: Dataset, what: str
) -> tuple[Dataset, dict[str, int]]:
    """``data`` with the batch axes the FP32 model proves, and each output's rows axis.

    The first split under which every output shows its rows wins; else the one under which
    most do. A split that runs but shows rows in no output (detections of varying count) is
    kept only when it splits every input that has an open axis: never half-split. Without
    any, the feeds go whole; only when the model refuses them whole, as the user gave them,
    is the data refused.
    """
    label_rows = None if data.labels is None or data.labels.ndim == 0 else len(data.labels)
    best: tuple[Dataset, dict[str, int]] | None = None
    unproven: Dataset | None = None
    open_inputs = {s.name for s in specs if free_axes(s, data.inputs[s.name])}
    for plan in plans(specs, data.inputs, label_rows):
        trial = Dataset(data.inputs, data.labels, plan, data.synthetic)
        if trial.rows < 2 or (label_rows is not None and trial.rows != label_rows):
            continue
        axes = proof(predictor, trial)
        if axes is not None and len(axes) == len(predictor.outputs):
            return trial, axes
        if axes and (best is None or len(axes) > len(best[1])):
            best = trial, axes
        if axes == {} and unproven is None and set(plan) == open_inputs:
            unproven = trial
    if best is not None:
        return best
    if unproven is not None:
        return unproven, {}
    whole = data.whole()
    try:
        predictor.run(whole.inputs, validate=False)
    except EdgebentoError as exc:
        raise ConfigError(f"the FP32 model refuses the data in {what} as given: {exc}") from exc
    if label_rows not in (None, 1):
        raise ConfigError(
            f"{what}: {label_rows} labels, but no split of the inputs into {label_rows} rows"
            " runs on the FP32 model"
        )
    return whole, {}
