"""A plain model never needs --monitor: 64 input columns beside a class output (the README's
digits model) would be 66 default features, past the cap of 64, so the widest defaulted
``columns`` tensor is summarised instead; a spec the user names is still held to the cap."""

from __future__ import annotations

import numpy as np
import pytest

from modelpack.baseline import build_baseline
from modelpack.errors import ConfigError
from modelpack.monitor import MAX_FEATURES, MonitorSpec, TensorInfo

INFOS = [
    TensorInfo("x", "float32", ["batch", 64]),
    TensorInfo("probs", "float32", ["batch", 10], output=True),
]


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    probs = rng.random((300, 10)).astype(np.float32)
    return {"x": rng.random((300, 64)).astype(np.float32), "probs": probs / probs.sum(1)[:, None]}


def test_defaults_past_the_cap_summarise_the_widest_input() -> None:
    baseline = build_baseline(_tensors(), INFOS)
    assert [(m.tensor, m.reducer) for m in baseline.monitor] == [
        ("x", "summary"),
        ("probs", "classes"),
    ]
    assert len(baseline.features) <= MAX_FEATURES


def test_a_named_spec_past_the_cap_is_refused() -> None:
    with pytest.raises(ConfigError, match="66 monitored features; at most 64"):
        build_baseline(_tensors(), INFOS, monitor=[MonitorSpec("x", "columns")])


def test_defaults_within_the_cap_keep_their_columns() -> None:
    rng = np.random.default_rng(1)
    tensors = {"x": rng.random((300, 12)).astype(np.float32), "probs": _tensors()["probs"]}
    infos = [TensorInfo("x", "float32", ["batch", 12]), INFOS[1]]
    assert [m.reducer for m in build_baseline(tensors, infos).monitor] == ["columns", "classes"]
