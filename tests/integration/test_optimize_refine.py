"""Refinement end to end: the real quantizer finds the fewest nodes to keep in float.

The model sums eight branches ``x @ W_i``. Each ``W_i`` has a row of outliers (every output
channel's scale is wide, so per-channel int8 does not help), bigger in later branches, and every
branch kept in float removes its share of the error. The simulation on the calibration rows is
not the budget on the held-back rows: the search has to find the count with real runs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimize import optimize_model
from optimize.search import EXCLUDE_TRIES

BRANCHES = 8


def _branches(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes, weights, parts = [], [], []
    for i in range(BRANCHES):
        w = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
        w[0, :] += 4.0 * (i + 1)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"branch{i}"))
        parts.append(f"p{i}")
    nodes.append(helper.make_node("Sum", parts, ["y"], name="sum"))
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_refinement_finds_the_fewest_nodes_in_float_that_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    optimize_model(
        _branches(tmp_path / "m.onnx"),
        tmp_path / "pack",
        name="branches",
        version=1,
        data=tmp_path / "cal.npz",
        eval_data=tmp_path / "eval.npz",
        quantize="dynamic",
        prune="off",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.5,
        metrics=["y=cosine>=0.999"],
    )
    rows = json.loads((tmp_path / "pack" / "report.json").read_text())["candidates"]
    plain = {r["candidate"]: r for r in rows if r["config"] and not r["config"].get("exclude")}
    assert plain and not any(r["within_budget"] for r in plain.values())  # int8 alone misses
    tried: dict[str, dict[int, bool]] = defaultdict(dict)
    for r in rows:
        excluded = r["config"].get("exclude") if r["config"] else None
        if excluded:
            family = r["candidate"].rsplit(" exclude-", 1)[0]
            assert family in plain
            assert r["candidate"] == f"{family} exclude-{len(excluded)}"
            assert len(excluded) not in tried[family], "a count was tried twice"
            tried[family][len(excluded)] = r["within_budget"]
    assert tried, "no candidate was refined"
    found = 0
    for family, counts in tried.items():
        assert len(counts) <= EXCLUDE_TRIES
        passing = [k for k, ok in counts.items() if ok]
        if passing:
            fewest = min(passing)
            # Found, not guessed: one fewer was tried for real and missed.
            assert fewest == 1 or counts.get(fewest - 1) is False, (family, counts)
            found += 1
    assert found >= 2, tried
