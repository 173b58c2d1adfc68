"""Cosine on probability maps: a crop without text has no direction to compare.

PP-OCR det's map of a crop without text is FP32's 0 to 3e-6 everywhere; int8 gave exact
zeros there, and the per-row cosine read 0.0 for every int8 candidate (issue 22), whatever
they did on the crops with text.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from optimize import metrics


def _score(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.asarray(metrics.cosine(ref, out, metrics.Context("map", {}, None, None)))


def _maps() -> np.ndarray:
    maps = np.zeros((3, 1, 8, 8), np.float32)
    maps[0, 0, 2:5, 1:7] = 0.95  # a text line
    maps[1, 0, 3, 3] = 3e-6  # FP32's speckle on an empty crop
    return maps


def test_an_empty_map_in_both_agrees_and_a_false_detection_does_not() -> None:
    ref = _maps()
    out = ref.copy()
    out[1] = 0.0  # int8: exact zeros where FP32 had its speckle
    out[0, 0, 2:5, 1:7] = 0.93
    scores = _score(ref, out)
    assert scores[1] == 1.0 and scores[2] == 1.0
    assert scores[0] > 0.99
    out[2, 0, 4:6, 4:6] = 0.4  # int8 finds text where FP32 found none: caught
    assert _score(ref, out)[2] == 0.0


def test_the_default_metric_decides_on_the_rows_with_text() -> None:
    ref = _maps()
    out = ref.copy()
    out[1] = 0.0
    out[0, 0, 2:5, 1:4] = 0.0  # half the line lost
    plan = metrics.defaults({"map": ref}, None, False)
    scores = metrics.evaluate(plan, {"map": ref}, {"map": out}, {}, None, 0.01)
    deciding = next(s for s in scores if s.decides)
    assert deciding.metric == "cosine@min"
    assert 0.6 < deciding.value < 0.8  # the line's loss, not the empty crop's speckle
    assert not deciding.ok


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-3, 1.0), st.integers(0, 63))
def test_a_value_above_the_floor_on_an_empty_map_is_never_agreement(
    value: float, pixel: int
) -> None:
    ref = _maps()
    out = ref.copy()
    out[2].reshape(-1)[pixel] = value  # FP32's row 2 is exactly empty
    assert _score(ref, out)[2] == 0.0
