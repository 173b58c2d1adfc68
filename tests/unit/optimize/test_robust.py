"""The command must not crash on the shapes real ONNX models come in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelpack import Predictor, load_pack
from modelpack.errors import ModelInvalidError
from optimize import optimize_model
from tests.unit.optimize import shapes

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "old-opset-11": lambda p: shapes.wide_mlp(p, opset=11),
    "several-inputs-and-a-scalar": shapes.several_inputs_scalar,
    "recurrent-state": shapes.recurrent,
    "broken-shape-info": shapes.bad_shape_info,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_odd_models_give_a_valid_pack(kind: str, tmp_path: Path, cache: Path) -> None:
    source = BUILDERS[kind](tmp_path / f"{kind}.onnx")
    result = optimize_model(
        source,
        tmp_path / "pack",
        name=kind,
        version=1,
        progress=False,
        cache=cache,
        latency_seconds=0.2,
    )
    pack = load_pack(result.pack_dir, trusted=[], allow_unsigned=True)
    assert pack.manifest.optimization["chosen"] == result.chosen.name
    report = json.loads(result.report_json.read_text())
    assert report["fidelity_data"] == "synthetic inputs (no --data given)"
    assert len(report["candidates"]) >= 2  # FP32 and at least one int8 variant were tried
    assert all(c["error"] or c["fidelity"] for c in report["candidates"])
    # The golden samples are what the chosen model gives: a device's health check passes.
    samples = pack.samples
    assert samples is not None
    predictor = Predictor.from_pack(pack)
    got = predictor.run(samples.inputs)
    for name, expected in samples.outputs.items():
        assert got[name].shape == expected.shape
    if kind == "old-opset-11":  # per-channel int8 needs opset 13; FP32 is packed as given
        opset = onnx.load(str(pack.model_path)).opset_import[0].version
        assert opset == 11 if result.chosen.name == "fp32" else opset >= 13


def test_histogram_calibrators_survive_a_short_last_batch(tmp_path: Path, cache: Path) -> None:
    # 22 calibration rows in batches of 8 left a batch of 6, which ORT's percentile calibrator
    # stacked into a ragged array ("inhomogeneous shape"); calibration now feeds equal batches.
    source = shapes.upsample_opset9(tmp_path / "old.onnx")
    x = np.random.default_rng(1).standard_normal((32, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="old",
        version=1,
        data=tmp_path / "data.npz",
        quantize="static",
        progress=False,
        cache=cache,
        latency_seconds=0.2,
    )
    rows = {r["candidate"]: r for r in result.rows}
    for name in ("static percentile per-channel", "static entropy per-channel"):
        assert rows[name]["error"] is None and rows[name]["fidelity"]["cosine_min"] > 0.9
    pack = load_pack(result.pack_dir, trusted=[], allow_unsigned=True)
    assert onnx.load(str(pack.model_path)).opset_import[0].version == 13  # upgraded from 9


def test_a_model_ort_cannot_run_is_a_clear_error(
    wide_mlp: Path, tmp_path: Path, cache: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    model = onnx.load(str(wide_mlp))
    model.graph.node[1].op_type = "NoSuchOp"
    onnx.save(model, str(broken))
    with pytest.raises(ModelInvalidError, match="NoSuchOp"):
        optimize_model(broken, tmp_path / "pack", name="b", version=1, progress=False, cache=cache)
    assert not (tmp_path / "pack").exists()


def test_symbolic_shape_inference_failure_falls_back(tmp_path: Path, cache: Path) -> None:
    source = shapes.runtime_expand(tmp_path / "expand.onnx")
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, shape=np.array([1, 4], np.int64))
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="expand",
        version=1,
        data=tmp_path / "data.npz",
        quantize="dynamic",
        progress=False,
        cache=cache,
        latency_seconds=0.2,
    )
    steps = json.loads(result.report_json.read_text())["footprint"]
    tries = [
        (s["config"]["skip_symbolic_shape"], s["error"]) for s in steps if s["name"] == "preprocess"
    ]
    assert tries[0][0] is False and tries[0][1] is not None  # ORT's symbolic inference gave up
    assert tries[1] == (True, None)  # and the retry without it worked
    assert all(r["fidelity"] for r in result.rows)


def test_percentile_survives_a_near_constant_activation(tmp_path: Path, cache: Path) -> None:
    source = shapes.near_constant(tmp_path / "flat.onnx")
    x = np.random.default_rng(2).standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="flat",
        version=1,
        data=tmp_path / "data.npz",
        quantize="static",
        prune="off",
        progress=False,
        cache=cache,
        latency_seconds=0.2,
    )
    rows = {r["candidate"]: r for r in result.rows}
    # ORT alone raises "Too many bins for data range" here; the float64 ranges stand in.
    percentile = rows["static percentile per-channel"]
    assert percentile["error"] is None, percentile["error"]
    assert percentile["fidelity"]["cosine_min"] > 0.9


def test_feeds_that_cannot_be_split_run_whole(tmp_path: Path, cache: Path) -> None:
    source = shapes.fixed_rows(tmp_path / "fixed.onnx")
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="fixed",
        version=1,
        data=tmp_path / "data.npz",
        eval_data=tmp_path / "data.npz",
        prune="off",
        quantize="dynamic",
        progress=False,
        cache=cache,
        latency_seconds=0.2,
    )
    report = json.loads(result.report_json.read_text())
    assert "the data's rows could not be split: every feed ran whole" in report["notes"]
    assert all(r["fidelity"] for r in report["candidates"])  # measured, not crashed
