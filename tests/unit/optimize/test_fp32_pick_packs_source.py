"""A FP32 pick packs the user's model as given: the normalized model (opset upgraded, shapes
inferred, nodes named) is where the passes start, not what the devices run. Only a model that
ONNX Runtime cannot run as given, or that fails onnx.checker (which every pack must pass), is
packed normalized, and the notes say why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpack import Predictor, load_pack
from modelpack.iosig import read_io_signature
from optimize import optimize_model
from optimize.load import opset_of


def _classifier(path: Path, opset: int, output_shape: list[str | int] | None = None) -> Path:
    """MatMul, Relu and Softmax with unnamed nodes, as paddle2onnx writes them: at opset 11 the
    version converter wraps the Softmax in Flatten and Reshape on the way to 13."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, output_shape)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _fp32_pick(source: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="m",
        version=1,
        quantize="off",
        prune="off",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.2,
    )
    assert result.chosen.name == "fp32" and result.reason.startswith("kept FP32")
    pack = load_pack(tmp_path / "pack", trusted=[], allow_unsigned=True)
    samples = pack.samples
    assert samples is not None  # the golden samples replay on what was packed
    got = Predictor.from_pack(pack).run(samples.inputs)
    np.testing.assert_allclose(got["p"], samples.outputs["p"], rtol=1e-5, atol=1e-6)
    return tmp_path / "pack", result.notes


def test_a_fp32_pick_packs_the_source_graph_byte_for_byte(tmp_path: Path) -> None:
    source = _classifier(tmp_path / "source.onnx", 11, ["batch", 4])
    pack, notes = _fp32_pick(source, tmp_path)
    packed = pack / "model.onnx"
    assert packed.read_bytes() == source.read_bytes()
    theirs, ours = onnx.load(str(source)), onnx.load(str(packed))
    assert [n.op_type for n in ours.graph.node] == ["MatMul", "Relu", "Softmax"]
    assert ours.graph.node == theirs.graph.node
    assert ours.graph.initializer == theirs.graph.initializer
    assert opset_of(ours) == 11 and not ours.graph.value_info
    manifest = json.loads((pack / "manifest.json").read_text())
    inputs, outputs = read_io_signature(source)
    assert [s.model_dump(mode="json") for s in inputs] == manifest["inputs"]
    assert [s.model_dump(mode="json") for s in outputs] == manifest["outputs"]
    summary = manifest["optimization"]
    assert summary["size_bytes"] == summary["fp32_size_bytes"] == source.stat().st_size
    report = json.loads((pack / "report.json").read_text())
    assert [s["name"] for s in report["footprint"]][:2] == ["normalize", "fp32"]
    assert not [n for n in notes if "the model as given is not packed" in n]


def test_a_model_onnx_runtime_cannot_run_as_given_is_packed_upgraded(tmp_path: Path) -> None:
    # Opset 5's Relu is one that ONNX Runtime no longer implements; at opset 13 it runs.
    source = _classifier(tmp_path / "old.onnx", 5, ["batch", 4])
    pack, notes = _fp32_pick(source, tmp_path)
    assert opset_of(onnx.load(str(pack / "model.onnx"))) == 13
    assert [n for n in notes if "ONNX Runtime cannot run it" in n and "opset 13" in n], notes


def test_a_model_that_fails_onnx_checker_is_packed_normalized(tmp_path: Path) -> None:
    # An output typed without a shape: ONNX Runtime runs it, onnx.checker (which load_pack
    # runs on every pack) refuses it; shape inference fills the shape in.
    source = _classifier(tmp_path / "shapeless.onnx", 13)
    pack, notes = _fp32_pick(source, tmp_path)
    onnx.checker.check_model(str(pack / "model.onnx"))
    assert [n for n in notes if "it fails onnx.checker" in n], notes
