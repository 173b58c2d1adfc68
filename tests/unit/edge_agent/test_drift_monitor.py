"""The agent's drift summaries through its own inference path (``InferenceService`` with the
drift hook): every answered row counted once, NaN and out-of-range values and schema refusals
counted apart, one summary per version and window, and nothing from a baseline changed on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.drift_summary import DriftSummary
from edge_agent.drift import DriftMonitor
from edge_agent.inference import InferenceService
from modelpack.baseline import BASELINE_FILE, make_baseline
from modelpack.errors import InputError
from modelpack.loader import load_pack
from modelpack.pack import Pack
from modelpack.predictor import Predictor
from tests.support.agent import make_pack


def _pack(tmp: Path, model: Path, version: int) -> Pack:
    root = make_pack(tmp / f"v{version}", model, None, version)
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    make_baseline(root, {"x": x})
    return load_pack(root, trusted=(), allow_unsigned=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _service(pack: Pack, monitor: DriftMonitor) -> InferenceService:
    service = InferenceService()
    service.swap(Predictor.from_pack(pack))
    service.core.drift = monitor  # type: ignore[attr-defined]
    return service


def test_rows_nan_out_of_range_and_refusals_per_window_and_version(
    tmp_path: Path, mlp_model: Path
) -> None:
    v1, v2 = _pack(tmp_path, mlp_model, 1), _pack(tmp_path, mlp_model, 2)
    current, clock = [v1], Clock()
    monitor = DriftMonitor(lambda: current[0], 60.0, fold_rows=7, clock=clock)
    service = _service(v1, monitor)
    rows = np.random.default_rng(1).standard_normal((5, 8))
    rows[1, 1] = 1e6  # far above the baseline's range
    for _ in range(3):
        service.run({"inputs": {"x": rows.tolist()}})
    with pytest.raises(InputError):
        service.run({"inputs": {"x": [[1.0, 2.0]]}})  # the wrong shape: refused, counted
    with pytest.raises(InputError):  # NaN never reaches a model: refused, counted
        service.run({"inputs": {"x": [[float("nan")] * 8]}})
    assert monitor.collect() == []  # the window is still open
    clock.now += 60
    service.run({"inputs": {"x": rows[:2].tolist()}})  # the next window
    current[0] = v2
    service.swap(Predictor.from_pack(v2))
    service.run({"inputs": {"x": rows[:1].tolist()}})  # a new version closes v1's window
    first, second = (DriftSummary.model_validate(d) for d in monitor.collect())
    (third,) = (DriftSummary.model_validate(d) for d in monitor.collect(force=True))
    assert (first.version, first.rows, second.rows, third.version, third.rows) == (1, 15, 2, 2, 1)
    assert first.window_start % 60 == 0 and second.window_start == first.window_start + 60
    assert sum(first.refused.values()) == 2, first.refused
    x0, x1 = first.features["x[0]"], first.features["x[1]"]
    assert x0.nan == 0 and sum(x0.c) == 15
    assert x1.c[-1] == 3 and sum(x1.c) == 15  # out of range: the last bin
    assert all(sum(f.c) + f.nan == 15 for f in first.features.values())
    assert first.baseline == v1.manifest.file(BASELINE_FILE).sha256  # type: ignore[union-attr]
    assert len(json.dumps(first.model_dump(mode="json"))) < 5000


def test_a_baseline_changed_on_disk_after_install_sends_nothing(
    tmp_path: Path, mlp_model: Path
) -> None:
    pack = _pack(tmp_path, mlp_model, 1)
    (pack.root / BASELINE_FILE).write_text((pack.root / BASELINE_FILE).read_text() + " ")
    monitor = DriftMonitor(lambda: pack, 60.0)
    service = _service(pack, monitor)
    service.run({"inputs": {"x": np.zeros((2, 8)).tolist()}})
    assert monitor.collect(force=True) == []


def test_a_fault_in_the_monitor_never_fails_a_request(tmp_path: Path, mlp_model: Path) -> None:
    pack = _pack(tmp_path, mlp_model, 1)

    def broken() -> Pack:
        raise RuntimeError("boom")

    monitor = DriftMonitor(broken, 60.0)
    service = _service(pack, monitor)
    answer = service.run({"inputs": {"x": np.zeros((1, 8)).tolist()}})
    assert "outputs" in answer.doc and monitor.failures == 1
