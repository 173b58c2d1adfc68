from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpack import TensorSpec
from modelpack.errors import ConfigError
from modelpack.iosig import read_io_signature
from optimize.data import Dataset, batch_axes, batch_dim_name, load_npz, split, synthesize
from tests.unit.optimize import shapes


def test_load_npz_names_the_missing_input(wide_mlp: Path, tmp_path: Path) -> None:
    inputs, _ = read_io_signature(wide_mlp)
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((4, 16), np.float32))
    with pytest.raises(ConfigError, match=r"no array .x.*holds features.*takes x"):
        load_npz(path, inputs)


def test_load_npz_refuses_wrong_rank_and_label_count(wide_mlp: Path, tmp_path: Path) -> None:
    inputs, _ = read_io_signature(wide_mlp)
    np.savez(tmp_path / "rank.npz", x=np.zeros(16, np.float32))
    with pytest.raises(ConfigError, match="rank 1; the model wants 2"):
        load_npz(tmp_path / "rank.npz", inputs)
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 16), np.float32), labels=np.zeros(3))
    with pytest.raises(ConfigError, match="3 labels for 4 rows"):
        load_npz(tmp_path / "labels.npz", inputs)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        load_npz(tmp_path / "junk.npz", inputs)


def test_split_holds_back_rows_and_keeps_labels(mlp_data: Path, wide_mlp: Path) -> None:
    inputs, _ = read_io_signature(wide_mlp)
    data = load_npz(mlp_data, inputs)
    calibration, evaluation = split(data)
    assert calibration.rows + evaluation.rows == 96
    assert evaluation.rows == 29 and evaluation.labels is not None
    assert evaluation.labels.shape == (29,)


def test_synthesize_fills_symbolic_dims_and_scalars(tmp_path: Path) -> None:
    model = shapes.several_inputs_scalar(tmp_path / "m.onnx")
    inputs, _ = read_io_signature(model)
    data = synthesize(model, inputs, rows=5)
    assert data.synthetic
    assert data.inputs["tokens"].shape == (5, 8) and data.inputs["tokens"].dtype == np.int64
    assert data.inputs["features"].shape == (5, 8, 8)
    assert data.inputs["temperature"].shape == ()
    assert data.batched == {"tokens", "features"}
    # Splitting by row leaves the scalar whole.
    assert data.take(slice(0, 2)).inputs["temperature"].shape == ()


def _spec(name: str, shape: list, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def test_batch_axes_come_from_the_dim_names_not_axis_0() -> None:
    # Silero VAD: the state's batch is axis 1, sr is a scalar.
    specs = [
        _spec("input", ["batch", "sequence"]),
        _spec("state", [2, "batch", 128]),
        _spec("sr", [], "int64"),
    ]
    feeds = {
        "input": np.zeros((5, 512), np.float32),
        "state": np.zeros((2, 5, 128), np.float32),
        "sr": np.array(16000),
    }
    assert batch_axes(specs, feeds) == {"input": 0, "state": 1}
    data = Dataset(feeds, None, batch_axes(specs, feeds))
    part = data.take(slice(1, 3)).inputs
    assert part["state"].shape == (2, 2, 128) and part["input"].shape == (2, 512)
    assert part["sr"].shape == ()


def test_a_shared_wildcard_dim_is_not_the_batch() -> None:
    # PP-OCR: x[-1, 3, '?', '?']: the '?' sides are image sizes, the unnamed first dim counts rows.
    specs = [_spec("x", [None, 3, "?", "?"])]
    assert batch_dim_name(specs) is None
    assert batch_axes(specs, {"x": np.zeros((4, 3, 48, 192), np.float32)}) == {"x": 0}


def test_an_input_whose_rows_disagree_goes_whole() -> None:
    specs = [_spec("a", ["batch", 4]), _spec("table", ["batch", 4])]
    feeds = {"a": np.zeros((6, 4), np.float32), "table": np.zeros((3, 4), np.float32)}
    assert batch_axes(specs, feeds) == {"a": 0}
