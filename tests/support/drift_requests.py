"""Requests as the drift hot path sees them, for the property tests of ``edge_agent.drift``:
the bins they are counted in, and one request of a kind (alike, strided, float64, scalar)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

EDGES = [[-1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 2.0], [-3.0, -1.0, 0.0, 1.0, 3.0], [0.25, 0.75]]
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, 0.5, 2.0, -1.0, 1.0, 3.0, 0.25]
KINDS = ["plain", "strided", "float64", "scalar"]

value = st.one_of(st.sampled_from(SPECIAL), st.floats(-5, 5, width=32))


def request(draw: st.DrawFn, rows: int, kind: str) -> tuple[dict[str, np.ndarray], int]:
    """``x`` of ``rows`` x 2 and ``p`` of ``rows`` x 2; ``strided``: the same ``x`` as every
    other column of a wider array; ``float64``: ``x`` of another dtype; ``scalar``: ``p`` with no
    row per request row."""
    x = np.asarray(draw(st.lists(value, min_size=rows * 2, max_size=rows * 2)), np.float32)
    x = x.reshape(rows, 2)
    p = np.asarray(draw(st.lists(value, min_size=rows * 2, max_size=rows * 2))).reshape(rows, 2)
    if kind == "strided":
        wide = np.zeros((rows, 4), np.float32)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif kind == "float64":
        x = x.astype(np.float64)
    elif kind == "scalar":
        p = np.asarray(0.5)
    return {"x": x, "p": p}, rows
