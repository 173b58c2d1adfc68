"""PP-OCR's direction classifier (opset 11, as the ``rapidocr-onnxruntime`` wheel ships it) kept
in FP32: the pack holds the wheel's model byte for byte, not the optimizer's normalized copy
(opset 13, its Softmax wrapped in Flatten and Reshape, a value_info per tensor), which timed
up to 7 % slower by CPU time in the images benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.bench_optimize_images import source
from benchmarks.real_images import FEEDS
from modelpack import Predictor, load_pack
from modelpack.iosig import read_io_signature
from optimize import optimize_model
from optimize.load import opset_of

pytestmark = pytest.mark.integration


def test_ppocr_cls_kept_in_fp32_packs_the_wheels_model(tmp_path: Path) -> None:
    model = source("ppocr_cls")
    np.savez(tmp_path / "data.npz", **FEEDS["ppocr_cls"](8, "calibration"))  # type: ignore[arg-type]
    np.savez(tmp_path / "eval.npz", **FEEDS["ppocr_cls"](8, "eval"))  # type: ignore[arg-type]
    result = optimize_model(
        model,
        tmp_path / "pack",
        name="ppocr-cls",
        version=1,
        data=tmp_path / "data.npz",
        eval_data=tmp_path / "eval.npz",
        quantize="off",
        prune="off",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.5,
    )
    assert result.chosen.name == "fp32"
    packed = tmp_path / "pack" / "model.onnx"
    assert packed.read_bytes() == model.read_bytes()
    theirs, ours = onnx.load(str(model)), onnx.load(str(packed))
    assert opset_of(ours) == opset_of(theirs) == 11
    assert ours.graph.node == theirs.graph.node
    assert ours.graph.initializer == theirs.graph.initializer
    assert ours.graph.value_info == theirs.graph.value_info
    # The pack's contract holds for the model as given: its io signature, its golden samples.
    pack = load_pack(tmp_path / "pack", trusted=[], allow_unsigned=True)
    inputs, outputs = read_io_signature(model)
    assert list(pack.manifest.inputs) == inputs and list(pack.manifest.outputs) == outputs
    samples = pack.samples
    assert samples is not None
    got = Predictor.from_pack(pack).run(samples.inputs)
    for name, expected in samples.outputs.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "pack" / "manifest.json").read_text())["optimization"]
    assert summary["size_bytes"] == summary["fp32_size_bytes"] == model.stat().st_size
