"""Verify candidates against the FP32 model: fidelity on held-back data, latency, size.

Latency is measured the way a fair comparison needs on a shared CPU: every model gets its own
session with spinning off (modelpack's session options), the models run interleaved in a
rotating order, and medians are reported, so drift in the machine's load hits all alike.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpack import Predictor, PredictorOptions, TensorSpec
from optimize.data import Dataset

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Fidelity:
    accuracy: float | None  # task accuracy, when labels are given
    top1_agreement: float | None  # argmax agreement with FP32, for class-score outputs
    cosine_min: float  # per-row cosine with FP32, over the float outputs of each row
    cosine_mean: float
    max_abs_error: float


@dataclass(frozen=True)
class Latency:
    p50_ms_batch1: float
    p99_ms_batch1: float
    p50_ms: float  # at the data's batch
    p99_ms: float
    batch: int


@dataclass(frozen=True)
class Size:
    bytes: int
    gzip_bytes: int


def load(model: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Predictor:
    """A session as every target opens it; raises ModelInvalidError when ORT refuses it."""
    return Predictor(model, inputs, outputs, PredictorOptions(warmup=False))


def run_all(predictor: Predictor, data: Dataset, batch: int) -> Outputs:
    """Outputs over every row of ``data``, run ``batch`` rows at a time and concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    for feed in data.batches(batch):
        for name, value in predictor.run(feed, validate=False).items():
            parts.setdefault(name, []).append(np.asarray(value))
    joined = {}
    for name, values in parts.items():
        same_rows = all(v.ndim >= 1 for v in values) and len(values) > 1
        joined[name] = np.concatenate(values) if same_rows else values[0]
    return joined


def _rowwise(outputs: Mapping[str, np.ndarray], rows: int) -> np.ndarray | None:
    """The float outputs with one entry per row, flattened and joined per row."""
    parts = [
        v.reshape(rows, -1).astype(np.float64)
        for v in outputs.values()
        if v.dtype.kind == "f" and v.ndim >= 1 and v.shape[0] == rows
    ]
    return np.concatenate(parts, axis=1) if parts else None


def _scores(outputs: Mapping[str, np.ndarray], rows: int) -> np.ndarray | None:
    """The first output that looks like class scores: [rows, classes>1], not an embedding.

    The argmax of an embedding means nothing, so outputs named like one are compared by
    cosine only.
    """
    for name, value in outputs.items():
        if "embed" in name.lower():
            continue
        if value.ndim == 2 and value.shape[0] == rows and value.shape[1] > 1:
            return value
    return None


def fidelity(reference: Outputs, outputs: Outputs, labels: np.ndarray | None) -> Fidelity:
    rows = next((v.shape[0] for v in reference.values() if v.ndim >= 1), 1)
    ref_scores, scores = _scores(reference, rows), _scores(outputs, rows)
    top1 = accuracy = None
    if ref_scores is not None and scores is not None:
        top1 = float(np.mean(ref_scores.argmax(1) == scores.argmax(1)))
        if labels is not None:
            accuracy = float(np.mean(scores.argmax(1) == labels.reshape(-1)))
    a, b = _rowwise(reference, rows), _rowwise(outputs, rows)
    cos_min = cos_mean = 1.0
    if a is not None and b is not None:
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        same = np.all(a == b, axis=1)
        cos = np.where(same, 1.0, (a * b).sum(1) / np.where(norms == 0, 1.0, norms))
        cos_min, cos_mean = float(cos.min()), float(cos.mean())
    max_abs = max(
        (
            float(np.max(np.abs(reference[k].astype(np.float64) - outputs[k].astype(np.float64))))
            for k in reference
            if k in outputs and reference[k].shape == outputs[k].shape and reference[k].size
        ),
        default=0.0,
    )
    return Fidelity(accuracy, top1, cos_min, cos_mean, max_abs)


def reference_accuracy(reference: Outputs, labels: np.ndarray | None) -> float | None:
    return fidelity(reference, reference, labels).accuracy


def size_of(model: Path) -> Size:
    data = model.read_bytes()
    return Size(len(data), len(gzip.compress(data, compresslevel=6)))


def latencies(
    predictors: Mapping[str, Predictor], data: Dataset, batch: int, seconds: float = 20.0
) -> dict[str, Latency]:
    """p50/p99 at batch 1 and at ``batch`` for every model, interleaved in rotating order."""
    feeds = {"one": data.take(slice(0, 1)).inputs, "batch": data.take(slice(0, batch)).inputs}
    names = list(predictors)
    times: dict[tuple[str, str], list[float]] = {(n, f): [] for n in names for f in feeds}
    for name in names:  # warm up: first runs allocate and pick kernels
        for feed in feeds.values():
            predictors[name].run(feed, validate=False)
    start = time.perf_counter()
    round_ = 0
    while True:
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            for kind, feed in feeds.items():
                t0 = time.perf_counter()
                predictors[name].run(feed, validate=False)
                times[(name, kind)].append((time.perf_counter() - t0) * 1000)
        round_ += 1
        elapsed = time.perf_counter() - start
        if round_ >= 40 or (round_ >= 5 and elapsed > seconds):
            break
    real_batch = min(batch, data.rows) if data.batched else 1
    return {
        n: Latency(
            float(np.median(times[(n, "one")])),
            float(np.percentile(times[(n, "one")], 99)),
            float(np.median(times[(n, "batch")])),
            float(np.percentile(times[(n, "batch")], 99)),
            real_batch,
        )
        for n in names
    }
