"""Requests stacked into one model run, and its outputs split back into each one's rows."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelpack.errors import InferenceError
from modelpack.serving.padding import SequenceAxis


def shape_key(feed: Mapping[str, np.ndarray], plan: SequenceAxis | None) -> tuple[Any, ...]:
    """Requests with equal keys can be stacked (the sequence axis may differ: it is padded).
    The dtype object itself, not its name: ``str(dtype)`` cost 10 µs a request."""
    if plan is None:
        return tuple([(name, array.dtype, array.shape[1:]) for name, array in sorted(feed.items())])
    key: list[Any] = []
    for name in sorted(feed):
        dims = list(feed[name].shape[1:])
        if name in plan.inputs:
            dims[plan.inputs[name] - 1] = -1
        key.append((name, feed[name].dtype, tuple(dims)))
    return tuple(key)


def split_rows(
    outputs: Mapping[str, np.ndarray], rows: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceError(
                f"output {name!r} has shape {list(array.shape)}: not batch-major, cannot batch"
            )
    bounds = np.cumsum([0, *rows])
    return [
        {name: array[start:end] for name, array in outputs.items()}
        for start, end in itertools.pairwise(bounds)
    ]
