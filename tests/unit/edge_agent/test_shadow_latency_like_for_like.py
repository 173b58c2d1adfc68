"""A shadow's run time is its model's run alone, as the live run's is: the feed check (done for
the live model before its clock starts) is done before the shadow's clock too, so a version as
fast as the live one is not judged slower by the rollout's latency ratio."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent import shadow as shadow_module
from edge_agent.inference import InferenceService
from edge_agent.shadow import ShadowRunner
from modelpack import Samples, create_pack
from modelpack.loader import load_pack
from modelpack.predictor import Predictor
from tests.support import models

CHECK_S = 1.0  # what the shadow's clock moves while its feed is checked


def _pack(root: Path, model: Path, version: int) -> Any:
    create_pack(
        model, root, name="tiny", version=version, samples=Samples(*models.golden_samples(model))
    )
    return load_pack(root, trusted=(), allow_unsigned=True)


def test_the_feed_check_is_outside_the_shadow_run_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models.mlp(tmp_path / "mlp.onnx")
    live, new = _pack(tmp_path / "v1", model, 1), _pack(tmp_path / "v2", model, 2)
    service = InferenceService()
    service.swap(Predictor.from_pack(live))
    # The shadow module's clock jumps CHECK_S whenever the shadow's feed is checked: a run
    # time that includes the check says so by whole seconds, however busy the machine is.
    jumped = [0.0]
    clock = SimpleNamespace(
        monotonic=time.monotonic,
        sleep=time.sleep,
        perf_counter=lambda: time.perf_counter() + jumped[0],
    )
    monkeypatch.setattr(shadow_module, "time", clock)
    predictor = Predictor.from_pack(new)
    check = predictor.validate

    def slow_check(inputs: Any, limits: Any = None) -> dict[str, np.ndarray]:
        jumped[0] += CHECK_S
        return check(inputs, limits)

    monkeypatch.setattr(predictor, "validate", slow_check)
    stand_in = SimpleNamespace(config=SimpleNamespace(data_dir=tmp_path / "agent"))
    runner = ShadowRunner(stand_in, service, lambda k, d: None, lambda: None)  # type: ignore[arg-type]
    service.core.shadow = runner  # type: ignore[attr-defined]
    runner.run_beside(new, predictor, tmp_path / "v2-copy", 200.0, 60)
    rng, give_up = np.random.default_rng(0), time.monotonic() + 120
    while (runner.figures is None or runner.figures.samples < 5) and time.monotonic() < give_up:
        service.run({"inputs": {"x": rng.standard_normal((1, 8)).tolist()}})
    figures = runner.figures
    runner.stop("test over")
    assert figures is not None and figures.samples >= 5 and figures.errors == 0, figures
    assert jumped[0] >= figures.samples * CHECK_S  # the shadow's feeds were checked
    assert figures.shadow_ms < figures.samples * CHECK_S * 1000, figures
