from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from modelpack.iosig import read_io_signature
from optimize.data import load_npz, synthesize
from optimize.prune import PruneConfig, find_pairs, prune_with


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]


def test_structured_pruning_removes_units_and_keeps_outputs(wide_mlp: Path, tmp_path: Path) -> None:
    inputs, _ = read_io_signature(wide_mlp)
    data = synthesize(wide_mlp, inputs, rows=64)
    out = tmp_path / "pruned.onnx"
    prune_with(data)(wide_mlp, out, PruneConfig(ratio=0.5))
    before, after = _weights(wide_mlp), _weights(out)
    # The units cut are gone from both sides, so the MatMuls do less work.
    assert before["w1"].shape == (16, 64) and after["w1"].shape == (16, 32)
    assert after["b1"].shape == (32,)
    assert after["w2"].shape == (32, 32) and after["w3"].shape == (32, 4)
    onnx.checker.check_model(onnx.load(str(out)))
    # Layer one's idle half (bias -50, never fires) is exactly what goes.
    np.testing.assert_array_equal(after["w1"], before["w1"][:, ::2])
    x = data.inputs["x"]
    assert _run(out, x).shape == (64, 4)
    assert len(find_pairs(onnx.load(str(wide_mlp)).graph, before)) == 2


def test_pruning_without_data_uses_weight_norms(wide_mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    prune_with(None)(wide_mlp, out, PruneConfig(ratio=0.75))
    assert _weights(out)["w1"].shape == (16, 16)
    x = np.ones((2, 16), np.float32)
    assert _run(out, x).shape == (2, 4)


def test_conv_channels_are_removed(cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn_pruned.onnx"
    prune_with(None)(cnn, out, PruneConfig(ratio=0.5))
    w = _weights(out)
    assert w["k1"].shape == (8, 1, 3, 3) and w["c1"].shape == (8,)
    assert w["k2"].shape == (16, 8, 3, 3)  # only the inputs of the second conv shrink
    assert _run(out, np.ones((1, 1, 8, 8), np.float32)).shape == (1, 4)


def test_bias_compensation_keeps_the_mean(mlp_data: Path, wide_mlp: Path, tmp_path: Path) -> None:
    """Dropping always-on units folds their mean output into the next bias."""
    inputs, _ = read_io_signature(wide_mlp)
    data = load_npz(mlp_data, inputs)
    out = tmp_path / "p.onnx"
    prune_with(data)(wide_mlp, out, PruneConfig(ratio=0.5))
    x = data.inputs["x"]
    agree = np.mean(_run(out, x).argmax(1) == _run(wide_mlp, x).argmax(1))
    assert agree >= 0.5  # half the live units of layer two are gone, without fine-tuning
