"""Class probabilities from an 8-bit quantized softmax (steps of 1/255, as the demo's optimized
digits model answers) are still probabilities: the baseline's default reducer and the shadow's
top-1 agreement both depend on it (``modelpack.monitor.probabilities``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.monitor import probabilities


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 20), st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_a_softmax_rounded_to_8_bits_is_probabilities(classes: int, rows: int, seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((rows, classes)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    quantized = (np.round(probs * 255) / 255).astype(np.float32)
    assert probabilities(quantized)
    assert not probabilities(logits.astype(np.float32) - 5)  # negative: not probabilities


def test_rows_far_from_summing_to_one_are_not_probabilities() -> None:
    assert not probabilities(np.full((4, 10), 0.09, np.float32))  # sums to 0.9
    assert not probabilities(np.full((4, 1000), 0.002, np.float32))  # sums to 2
