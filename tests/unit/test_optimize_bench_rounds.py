"""The optimize benchmarks' timing rounds: each timing figure of a side-by-side run is the
summary of its rounds (median, range, count), fidelity and size stay the model's own, and a
benchmark whose search runs once says so in the README's runs column."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.optimize_common import side_by_side
from benchmarks.runs import is_summary
from optimize.data import Dataset


def _matmul(path: Path, scale: float) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * scale, "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_side_by_side_rounds_summarize_the_timings_and_keep_fidelity_plain(
    tmp_path: Path,
) -> None:
    models = {"fp32": _matmul(tmp_path / "a.onnx", 1.0), "other": _matmul(tmp_path / "b.onnx", 2.0)}
    rows = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    data = Dataset({"x": rows}, None, {"x": 0})
    table = side_by_side(models, data, batch=8, labels=None, seconds=0.01, rounds=3)
    for row in table.values():
        for key in ("p50_ms", "p99_ms", "p50_ms_batch1", "speedup", "speedup_by_cpu"):
            assert is_summary(row[key]) and row[key]["runs"] == 3, (key, row[key])
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"]
        assert row["batch"] == 8 and isinstance(row["size_bytes"], int)
    assert table["fp32"]["speedup"]["values"] == [1.0, 1.0, 1.0]  # each round against its FP32
    assert table["fp32"]["speedup_by_cpu"]["values"] == [1.0, 1.0, 1.0]
    assert table["fp32"]["cosine_min"] == 1.0 and table["other"]["cosine_min"] == 1.0
    # One round (the MiniLM benchmarks' call) keeps plain numbers.
    single = side_by_side(models, data, batch=8, labels=None, seconds=0.01)
    assert isinstance(single["other"]["speedup"], float)


def test_a_search_run_once_with_timing_rounds_says_so_in_the_runs_column() -> None:
    timing = {"median": 1.2, "min": 1.1, "max": 1.3, "runs": 3, "values": [1.1, 1.2, 1.3]}
    doc = {"runs_note": "search 1, timing median of 3", "models": {"m": {"speedup": timing}}}
    assert report.runs_note(doc) == "search 1, timing median of 3"
    assert report.runs_note({"models": {"m": {"speedup": timing}}}) == "median of 3"
