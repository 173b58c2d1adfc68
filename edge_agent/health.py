"""The health check a pack passes before it serves: its golden samples, or synthesized inputs.

With golden samples, the outputs must match them within tolerance. Without, inputs are
synthesized from the io signature (symbolic dims set to 1; small values of each input's dtype)
and every floating-point output must be finite. Either way the median of a few runs must be
within the latency budget, so a pack without samples is never installed unchecked.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from modelpack.errors import EdgebentoError, PackError
from modelpack.manifest import TensorSpec
from modelpack.pack import Pack
from modelpack.predictor import Predictor

RUNS = 5


class HealthCheckError(PackError):
    """A pack that verified but does not reproduce its golden samples, fails or is too slow."""


def synthesize(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in (spec.shape or [1])]
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return np.zeros(shape, dtype=dtype)  # 0 is a valid token id, index and class everywhere
    if dtype.kind == "b":
        return np.zeros(shape, dtype=dtype)
    raise HealthCheckError(f"health check: cannot synthesize input {spec.name!r} of {spec.dtype}")


def _timed_runs(predictor: Predictor, inputs: dict[str, Any], what: str) -> tuple[dict, float]:
    timings = []
    outputs: dict[str, Any] = {}
    for _ in range(RUNS):
        start = time.perf_counter()
        try:
            outputs = predictor.run(inputs)
        except EdgebentoError as exc:
            raise HealthCheckError(f"health check failed: {what} fail: {exc}") from exc
        timings.append((time.perf_counter() - start) * 1000)
    return outputs, sorted(timings)[len(timings) // 2]


def _check_budget(median: float, budget: float, what: str) -> None:
    if median > budget:
        raise HealthCheckError(
            f"health check failed: {median:.1f} ms per {what} is over the {budget} ms budget"
        )


def health_check(
    pack: Pack, predictor: Predictor, budget_ms: float, rtol: float, atol: float
) -> dict[str, Any]:
    samples = pack.samples
    if samples is None or not samples.inputs:
        return _synthetic(pack, predictor, budget_ms)
    outputs, median = _timed_runs(predictor, samples.inputs, "golden inputs")
    for name, expected in samples.outputs.items():
        got = outputs.get(name)
        if got is None or got.shape != expected.shape:
            raise HealthCheckError(f"health check failed: output {name!r} has the wrong shape")
        if not np.allclose(got, expected, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
            raise HealthCheckError(
                f"health check failed: output {name!r} differs from the golden samples "
                f"by up to {worst:.3g}"
            )
    _check_budget(median, budget_ms, "golden batch")
    return {
        "golden": "ok",
        "samples": len(next(iter(samples.inputs.values()))),
        "median_ms": round(median, 3),
    }


def _synthetic(pack: Pack, predictor: Predictor, budget_ms: float) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    inputs = {spec.name: synthesize(spec, rng) for spec in predictor.inputs.values()}
    outputs, median = _timed_runs(predictor, inputs, "synthesized inputs")
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise HealthCheckError(
                f"health check failed: output {name!r} is not finite on synthesized inputs"
            )
    _check_budget(median, budget_ms, "synthesized batch")
    return {"golden": "none in pack", "synthesized": "ok", "median_ms": round(median, 3)}
