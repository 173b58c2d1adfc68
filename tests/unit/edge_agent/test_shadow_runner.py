"""The device's shadow runner (``edge_agent.shadow``) through the agent's own inference path:
the live model answers every request, the shadow runs at most ``rate`` times a second and never
while the infer queue holds requests, and its figures say how far it agrees."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edge_agent.inference import InferenceService
from edge_agent.shadow import ShadowRunner
from modelpack import Samples, create_pack
from modelpack.loader import load_pack
from modelpack.predictor import Predictor
from tests.support import models
from tests.support.shadow_models import flipping_mlp


def _pack(root: Path, model: Path, version: int) -> Any:
    samples = Samples(*models.golden_samples(model))
    create_pack(model, root, name="tiny", version=version, samples=samples)
    return load_pack(root, trusted=(), allow_unsigned=True)


def _setup(tmp_path: Path, new_model: Path) -> tuple[InferenceService, Any, list[tuple[str, dict]]]:
    live = _pack(tmp_path / "v1", models.mlp(tmp_path / "live.onnx"), 1)
    new = _pack(tmp_path / "v2", new_model, 2)
    service = InferenceService()
    service.swap(Predictor.from_pack(live))
    records: list[tuple[str, dict]] = []
    stand_in = SimpleNamespace(config=SimpleNamespace(data_dir=tmp_path / "agent"))
    runner = ShadowRunner(stand_in, service, lambda k, d: records.append((k, d)), lambda: None)  # type: ignore[arg-type]
    service.core.shadow = runner  # type: ignore[attr-defined]
    return service, (runner, new), records


def _serve(service: InferenceService, done: Callable[[], bool], seed: int = 0) -> int:
    """Answers requests until ``done()`` (what the test waits for), however busy the machine;
    past two minutes it stops and the test's own assertions say what was missing."""
    rng, answered = np.random.default_rng(seed), 0
    give_up = time.monotonic() + 120
    while not done() and time.monotonic() < give_up:
        reply = service.run({"inputs": {"x": rng.standard_normal((1, 8)).tolist()}})
        assert reply.doc["model"]["version"] == 1  # the live model answers, always
        answered += 1
    return answered


def _sampled(runner: ShadowRunner, at_least: int) -> Callable[[], bool]:
    return lambda: runner.figures is not None and runner.figures.samples >= at_least


def _settle(runner: ShadowRunner) -> None:
    deadline = time.monotonic() + 5
    active = runner._active
    while active is not None and active.slot is not None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_flipping_version_agrees_on_about_nine_tenths_at_the_rate_asked(tmp_path: Path) -> None:
    service, (runner, new), records = _setup(tmp_path, flipping_mlp(tmp_path / "flip.onnx"))
    started = time.monotonic()
    runner.run_beside(new, Predictor.from_pack(new), tmp_path / "v2", 200.0, 60)
    answered = _serve(service, _sampled(runner, 150))
    _settle(runner)
    elapsed = time.monotonic() - started
    figures = runner.figures
    assert figures is not None and figures.metric == "top1"
    assert answered > figures.samples >= 150, (answered, figures)
    assert figures.samples <= 200 * elapsed + 1  # never above the rate
    assert 0.8 < figures.agreement < 0.97, figures  # type: ignore[operator]
    assert figures.max_abs is not None and figures.max_abs > 0.01
    assert figures.current_ms > 0 and figures.shadow_ms > 0
    runner.stop("test over")
    assert records[-1][0] == "shadow" and records[-1][1]["state"] == "stopped"


def test_the_same_model_agrees_on_every_answer(tmp_path: Path) -> None:
    service, (runner, new), _ = _setup(tmp_path, models.mlp(tmp_path / "same.onnx"))
    runner.run_beside(new, Predictor.from_pack(new), tmp_path / "v2", 200.0, 60)
    _serve(service, _sampled(runner, 30))
    _settle(runner)
    figures = runner.figures
    assert figures is not None and figures.samples >= 30
    assert figures.agreeing == figures.rows and figures.max_abs == 0.0
    runner.stop()


def test_no_shadow_run_while_the_infer_queue_holds_requests(tmp_path: Path) -> None:
    service, (runner, new), _ = _setup(tmp_path, models.mlp(tmp_path / "same.onnx"))
    runner.run_beside(new, Predictor.from_pack(new), tmp_path / "v2", 200.0, 60)
    service._pending = 3  # requests waiting for the model: the device is busy
    _serve(service, lambda: runner.figures is not None and runner.figures.busy > 2)
    _settle(runner)
    busy = runner.figures
    assert busy is not None and busy.samples == 0 and busy.busy > 2, busy
    service._pending = 0
    _serve(service, _sampled(runner, 11), seed=1)
    _settle(runner)
    assert runner.figures.samples > 10  # type: ignore[union-attr]
    runner.stop()
