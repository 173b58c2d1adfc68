"""Verify candidates against the FP32 model: fidelity on held-back data, latency, size.

Latency is measured the way a fair comparison needs on a shared CPU: every model gets its own
session with spinning off (modelpack's session options), the models run interleaved in a
rotating order, and medians are reported, so drift in the machine's load hits all alike.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpack import Predictor, PredictorOptions, TensorSpec
from optimize import metrics
from optimize.data import Dataset
from optimize.metrics import Score

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Fidelity:
    accuracy: float | None  # task accuracy, when labels are given
    top1_agreement: float | None  # argmax agreement with FP32, for class-score outputs
    cosine_min: float  # per-row cosine with FP32 (real tokens only), lowest over the outputs
    cosine_mean: float
    max_abs_error: float
    scores: tuple[Score, ...] = ()  # every metric measured; those with ``decides`` judge
    pooled_cosine_min: float | None = None  # mean over the attention mask, for sequences

    @property
    def deciding(self) -> Score | None:
        """The deciding score closest to (or furthest past) its bound: it decided."""
        judged = [s for s in self.scores if s.decides]
        return min(judged, key=lambda s: s.margin) if judged else None

    @property
    def decided_by(self) -> str | None:
        found = self.deciding
        return found.key if found else None


@dataclass(frozen=True)
class Latency:
    """Times at one row and at ``batch`` rows: the batch the service runs the model at (up to
    its 64 rows when rows are independent, one request at a time otherwise)."""

    p50_ms_batch1: float
    p99_ms_batch1: float
    p50_ms: float  # at ``batch`` rows
    p99_ms: float
    batch: int

    @property
    def ms_per_row(self) -> float:
        """What the pick compares: the cost of a row as the service runs the model."""
        return self.p50_ms / max(self.batch, 1)


@dataclass(frozen=True)
class Size:
    bytes: int
    gzip_bytes: int


def load(model: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Predictor:
    """A session as every target opens it; raises ModelInvalidError when ORT refuses it."""
    return Predictor(model, inputs, outputs, PredictorOptions(warmup=False))


def run_all(
    predictor: Predictor,
    data: Dataset,
    batch: int,
    axes: Mapping[str, int],
    extra: Mapping[str, np.ndarray] | None = None,
) -> Outputs:
    """Outputs over every row of ``data``, ``batch`` rows at a time, rows on axis 0.

    ``extra`` feeds go into every batch as they are (the sensitivity graph's switches).
    """
    parts: dict[str, list[np.ndarray]] = {}
    for feed in data.batches(batch):
        for name, value in predictor.run(feed | dict(extra or {}), validate=False).items():
            array = np.asarray(value)
            axis = axes.get(name)
            parts.setdefault(name, []).append(
                np.moveaxis(array, axis, 0) if axis is not None else array[None]
            )
    joined = {}
    for name, values in parts.items():
        try:
            joined[name] = np.concatenate(values)
        except ValueError:  # shapes that vary by batch (detections): compared as one vector
            joined[name] = np.concatenate([v.reshape(-1) for v in values])[None]
    return joined


def rows_first(data: Dataset) -> dict[str, np.ndarray]:
    return {
        k: np.moveaxis(v, data.axes[k], 0) if k in data.axes else v for k, v in data.inputs.items()
    }


def fidelity(
    reference: Outputs,
    outputs: Outputs,
    data: Dataset,
    plan: Sequence[metrics.MetricSpec],
    max_drop: float,
) -> Fidelity:
    inputs = rows_first(data)
    scores = metrics.evaluate(plan, reference, outputs, inputs, data.labels, max_drop)

    def values(metric: str) -> list[float]:
        return [s.value for s in scores if s.metric.split("@")[0] == metric]

    mask = metrics.mask_input(inputs)
    cos_rows = [
        metrics.cosine(
            ref, outputs[k], metrics.Context(k, inputs, data.labels, metrics.mask_for(ref, mask))
        )
        for k, ref in reference.items()
        if ref.dtype.kind == "f" and k in outputs and outputs[k].shape == ref.shape
    ]
    accuracy, top1 = values("accuracy"), values("top1")
    pooled = values("pooled-cosine")
    return Fidelity(
        accuracy[0] if accuracy else None,
        min(top1) if top1 else None,
        min((float(c.min()) for c in cos_rows), default=1.0),
        min((float(c.mean()) for c in cos_rows), default=1.0),
        max(values("max-abs"), default=0.0),
        tuple(scores),
        min(pooled) if pooled else None,
    )


def size_of(model: Path) -> Size:
    data = model.read_bytes()
    return Size(len(data), len(gzip.compress(data, compresslevel=6)))


def batching_refusal(predictor: Predictor, outputs: Sequence[TensorSpec]) -> str | None:
    """Why the serving core would run this model one request at a time, None when it batches
    requests together: the service's own checks, so that each candidate is measured as it
    will be served (dynamic int8 scales activations over the whole batch: rows mix)."""
    from modelpack.serving.model import rows_are_independent

    if not predictor.batch_dynamic or not all(s.batch_dynamic for s in outputs):
        return "not every input and output has a dynamic batch dim"
    return rows_are_independent(predictor)


def latencies(
    predictors: Mapping[str, Predictor],
    data: Dataset,
    batch: int,
    seconds: float = 20.0,
    alone: Collection[str] = (),
) -> dict[str, Latency]:
    """p50/p99 at batch 1 and at ``batch`` for every model, interleaved in rotating order.

    The models in ``alone`` are those the service runs one request at a time: they are timed
    at one row only, and that is their batch.
    """
    if not predictors:
        return {}
    feeds = {"one": data.take(slice(0, 1)).inputs, "batch": data.take(slice(0, batch)).inputs}
    names = list(predictors)
    kinds = {n: ("one",) if n in alone else ("one", "batch") for n in names}
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in names for k in kinds[n]}
    for name in names:  # warm up: first runs allocate and pick kernels
        for kind in kinds[name]:
            predictors[name].run(feeds[kind], validate=False)
    start = time.perf_counter()
    round_ = 0
    while True:
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            for kind in kinds[name]:
                t0 = time.perf_counter()
                predictors[name].run(feeds[kind], validate=False)
                times[(name, kind)].append((time.perf_counter() - t0) * 1000)
        round_ += 1
        elapsed = time.perf_counter() - start
        if round_ >= 40 or (round_ >= 5 and elapsed > seconds):
            break
    real_batch = min(batch, data.rows) if data.batched else 1
    found = {}
    for n in names:
        one, many = times[(n, "one")], times.get((n, "batch"), [])
        found[n] = Latency(
            float(np.median(one)),
            float(np.percentile(one, 99)),
            float(np.median(many or one)),
            float(np.percentile(many or one, 99)),
            real_batch if many else 1,
        )
    return found
