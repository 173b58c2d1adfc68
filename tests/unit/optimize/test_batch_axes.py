"""Batch axes proven by running the FP32 model: tiny ONNX models whose dims do not say.

The models name no dim (``None`` everywhere), so the signature cannot tell rows from time
steps; the data's sizes collide on purpose, and only running a split can tell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from modelpack import Predictor
from modelpack.errors import ConfigError
from modelpack.iosig import read_io_signature
from optimize.axes import plans, settle
from optimize.data import Dataset, batch_axes


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list | None = None) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _f32(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture(scope="module")
def axis1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recurrent-style cell with its batch on axis 1 of every input, no dim named:
    ``x [time, batch, 4]``, ``h [1, batch, 3]``; ``y = sum_t x`` is ``[batch, 4]``,
    ``h2 = h * 2`` is ``[1, batch, 3]``."""
    axes = helper.make_tensor("axes0", TensorProto.INT64, [1], [0])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes0"], ["y"], keepdims=0),
        helper.make_node("Mul", ["h", "two"], ["h2"]),
    ]
    return _save(
        tmp_path_factory.mktemp("axes") / "axis1.onnx",
        nodes,
        [_f32("x", [None, None, 4]), _f32("h", [1, None, 3])],
        [_f32("y", [None, 4]), _f32("h2", [1, None, 3])],
        [axes, two],
    )


@pytest.fixture(scope="module")
def mixing_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Softmax over axis 0: every 'row' changes with the others, so no split is honest."""
    return _save(
        tmp_path_factory.mktemp("axes") / "mix.onnx",
        [helper.make_node("Softmax", ["x"], ["y"], axis=0)],
        [_f32("x", [None, 3])],
        [_f32("y", [None, 3])],
    )


def _settle(model: Path, feeds: dict[str, np.ndarray], labels: np.ndarray | None = None) -> tuple:
    inputs, outputs = read_io_signature(model)
    predictor = Predictor(model, inputs, outputs)
    data = Dataset(feeds, labels, batch_axes(inputs, feeds))
    return settle(predictor, inputs, data, "data.npz")


def test_batch_on_axis_1_for_every_input_is_found_by_running(axis1_model: Path) -> None:
    rng = np.random.default_rng(0)
    # 6 time steps and 6 rows: the sizes alone cannot tell x's axes apart.
    feeds = {
        "x": rng.standard_normal((6, 6, 4)).astype(np.float32),
        "h": rng.standard_normal((1, 6, 3)).astype(np.float32),
    }
    inputs, _ = read_io_signature(axis1_model)
    # What the signature alone guessed: x split on axis 0 and h kept whole (a half split).
    assert batch_axes(inputs, feeds) == {"x": 0}
    data, outputs = _settle(axis1_model, feeds)
    assert dict(data.axes) == {"x": 1, "h": 1} and outputs == {"y": 0, "h2": 1}
    part = data.take(slice(2, 5)).inputs
    assert part["x"].shape == (6, 3, 4) and part["h"].shape == (1, 3, 3)
    np.testing.assert_array_equal(part["h"], feeds["h"][:, 2:5])


def test_rows_that_mix_are_never_split_and_the_whole_feed_runs(mixing_model: Path) -> None:
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)}
    data, outputs = _settle(mixing_model, feeds)
    assert dict(data.axes) == {} and outputs == {}
    assert data.take(slice(0, 1)).inputs["x"].shape == (5, 3)  # every run gets all 5


def test_refused_only_when_the_whole_feed_is_refused(axis1_model: Path) -> None:
    # h's last dim is 3 in the model: ONNX Runtime refuses this feed as given.
    feeds = {"x": np.zeros((2, 4, 4), np.float32), "h": np.zeros((1, 4, 5), np.float32)}
    with pytest.raises(ConfigError, match=r"the FP32 model refuses the data in data\.npz as given"):
        _settle(axis1_model, feeds)


def test_labels_pick_the_row_count(axis1_model: Path) -> None:
    feeds = {"x": np.zeros((4, 6, 4), np.float32), "h": np.zeros((1, 6, 3), np.float32)}
    inputs, _ = read_io_signature(axis1_model)
    assert plans(inputs, feeds, 6)[1] == {"x": 1, "h": 1}
    data, _ = _settle(axis1_model, feeds, np.arange(6))
    assert data.rows == 6


def _reduce_all_but(tmp: Path, rank: int, batch: int) -> Path:
    """``y[b] = sum of x over every axis but ``batch``: rows on that axis only."""
    others = [a for a in range(rank) if a != batch]
    axes = helper.make_tensor("axes", TensorProto.INT64, [len(others)], others)
    return _save(
        tmp / f"r{rank}b{batch}.onnx",
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        [_f32("x", [None] * rank)],
        [_f32("y", [None])],
        [axes],
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.integers(0, 2),
    sizes=st.lists(st.integers(2, 4), min_size=3, max_size=3),
)
def test_the_proven_axis_is_the_one_rows_lie_on(
    tmp_path: Path, batch: int, sizes: list[int]
) -> None:
    model = _reduce_all_but(tmp_path, 3, batch)
    feeds = {"x": np.random.default_rng(2).standard_normal(sizes).astype(np.float32)}
    data, outputs = _settle(model, feeds)
    assert dict(data.axes) == {"x": batch} and outputs == {"y": 0}


def test_labels_count_rows_on_whichever_axis_holds_them(axis1_model: Path, tmp_path: Path) -> None:
    from optimize.data import load_npz

    inputs, _ = read_io_signature(axis1_model)
    feeds = {"x": np.zeros((4, 6, 4), np.float32), "h": np.zeros((1, 6, 3), np.float32)}
    np.savez(tmp_path / "ok.npz", **feeds, labels=np.arange(6))  # type: ignore[arg-type]
    assert load_npz(tmp_path / "ok.npz", inputs).labels is not None
    # 3 is no input's size on an open axis (x's last 4 and h's 1 and 3 are fixed): refused.
    np.savez(tmp_path / "bad.npz", **feeds, labels=np.arange(3))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="3 labels for"):
        load_npz(tmp_path / "bad.npz", inputs)
