"""A shadow judges agreement by the metric its pack was optimized with (the deciding score of
the signed ``report.json``), not by the output's shape alone: ``max-abs`` counts the rows within
the pack's own bound, ``cosine`` the rows' cosine, ``accuracy`` (no labels on a device) the
top-1 agreement; a user's ``module:function`` is never imported on a device."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent.inference import InferenceService
from edge_agent.shadow import ShadowRunner
from modelpack import Samples, create_pack
from modelpack.loader import load_pack
from modelpack.predictor import Predictor
from tests.support import models
from tests.support.shadow_models import FLIP_ABOVE, flipping_mlp


def _report(path: Path, *scores: tuple[str, str, float, bool]) -> Path:
    rows = [
        {"output": o, "metric": m, "value": 1.0, "fp32": 1.0, "bound": b, "decides": d, "ok": True}
        for o, m, b, d in scores
    ]
    chosen = {"candidate": "int8", "chosen": True, "fidelity": {"scores": rows}}
    doc = {"chosen": "int8", "candidates": [{"candidate": "fp32", "chosen": False}, chosen]}
    path.write_text(json.dumps(doc))
    return path


def _judge(tmp: Path, model: Path, report: Path | None) -> Any:
    """The figures of one shadow run on 400 fixed rows, through the runner's own judging."""
    live_model = models.mlp(tmp / "live.onnx")
    live = Predictor.from_pack(_pack(tmp / "v1", live_model, 1, None))
    new = _pack(tmp / "v2", model, 2, report)
    service = InferenceService()
    stand_in = SimpleNamespace(config=SimpleNamespace(data_dir=tmp / "agent"))
    runner = ShadowRunner(stand_in, service, lambda k, d: None, lambda: None)  # type: ignore[arg-type]
    runner.run_beside(new, Predictor.from_pack(new), tmp / "v2", 1.0, 60)
    feed = {"x": np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)}
    assert runner._active is not None
    runner._run(runner._active, feed, live.run(feed), 0.001)
    figures = runner.figures
    runner.stop()
    return figures, feed


def _pack(root: Path, model: Path, version: int, report: Path | None) -> Any:
    samples = Samples(*models.golden_samples(model))
    create_pack(model, root, name="tiny", version=version, samples=samples, report=report)
    return load_pack(root, trusted=(), allow_unsigned=True)


def test_max_abs_counts_the_rows_within_the_packs_bound(tmp_path: Path) -> None:
    report = _report(tmp_path / "r.json", ("logits", "max-abs@max", 1e-3, True))
    same, _ = _judge(tmp_path / "same", models.mlp(tmp_path / "same.onnx"), report)
    assert (same.metric, same.bound, same.agreement) == ("max_abs", 1e-3, 1.0)
    assert "rows within max |diff| 0.001 1.0000" in same.line()
    flip, feed = _judge(tmp_path / "flip", flipping_mlp(tmp_path / "flip.onnx"), report)
    unchanged = float((feed["x"][:, 0] <= FLIP_ABOVE).mean())
    assert flip.metric == "max_abs" and 0.5 < unchanged < 1
    assert flip.agreement == pytest.approx(unchanged)


def test_cosine_and_accuracy_are_judged_as_the_pack_was(tmp_path: Path) -> None:
    # The deciding score, not the first: a cosine on the logits beats top-1 by shape on probs.
    report = _report(
        tmp_path / "r.json",
        ("probs", "top1@mean", 0.99, False),
        ("logits", "cosine@min", 0.99, True),
    )
    figures, _ = _judge(tmp_path / "cos", flipping_mlp(tmp_path / "flip.onnx"), report)
    assert figures.metric == "cosine" and figures.bound is None
    accuracy = _report(tmp_path / "a.json", ("logits", "accuracy@mean", 0.99, True))
    figures, _ = _judge(tmp_path / "acc", models.mlp(tmp_path / "same.onnx"), accuracy)
    assert figures.metric == "top1" and figures.agreement == 1.0


def test_a_users_metric_or_no_report_falls_back_to_the_outputs_shape(tmp_path: Path) -> None:
    report = _report(tmp_path / "r.json", ("logits", "os:system@mean", 0.5, True))
    figures, _ = _judge(tmp_path / "user", models.mlp(tmp_path / "same.onnx"), report)
    assert figures.metric == "top1"  # probs are probabilities: top-1 by shape
    figures, _ = _judge(tmp_path / "none", models.mlp(tmp_path / "same.onnx"), None)
    assert figures.metric == "top1"
