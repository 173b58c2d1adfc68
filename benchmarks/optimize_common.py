"""What the optimize benchmarks share: baselines measured side by side with edgebento's pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runs import summarize
from modelpack.iosig import read_io_signature
from optimize import metrics, verify
from optimize.axes import settle
from optimize.data import Dataset


def quantize_dynamic_defaults(model: Path, out: Path) -> Path:
    """What people do by hand: onnxruntime's quantize_dynamic with its defaults."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out))
    return out


def side_by_side(
    models: dict[str, Path],
    data: Dataset,
    batch: int,
    labels: np.ndarray | None,
    seconds: float,
    metric_specs: tuple[str, ...] = (),
    alone: tuple[str, ...] = (),
    rounds: int = 1,
    rotate: int = 0,
) -> dict[str, dict[str, Any]]:
    """Fidelity against the first model, size and interleaved latency, from one run.

    Fidelity uses the same metrics as the search (``metric_specs`` as ``--metric`` reads them,
    else each output's default), so a figure here means what it means in the report. The
    models in ``alone`` are timed one row at a time, as the service runs a model whose rows
    depend on their neighbours; ``speedup`` is per row as served, as the search's.

    With ``rounds`` > 1 the models are timed that many times (each round interleaved, the
    order rotated from round to round) and each timing figure is the summary of its rounds
    (``benchmarks.runs.summary``: median, range, count); fidelity and size are the models'
    own, the same every round, so they are computed once. ``rotate`` starts the rotation
    further on (a benchmark that calls this once per round of its own passes its round).
    """
    first = next(iter(models.values()))
    inputs, outputs = read_io_signature(first)
    data = Dataset(data.inputs, labels, data.axes)
    predictors = {k: verify.load(p, inputs, outputs) for k, p in models.items()}
    fp32 = next(iter(predictors.values()))
    data, axes = settle(fp32, inputs, data, "the benchmark's data")
    reference = verify.run_all(fp32, data, batch, axes)
    plan = metrics.plan(
        [metrics.MetricSpec.parse(m) for m in metric_specs],
        reference,
        metrics.mask_input(verify.rows_first(data)),
        labels is not None,
    )
    timed = [_timings(predictors, data, batch, seconds, alone, rotate + r) for r in range(rounds)]
    timings = timed[0] if rounds == 1 else summarize(timed, digits=4)
    found = {}
    for name, predictor in predictors.items():
        outs = verify.run_all(predictor, data, batch, axes)
        fid = verify.fidelity(reference, outs, data, plan, 0.01)
        size = verify.size_of(models[name])
        found[name] = timings[name] | {
            "batch": timed[0][name]["batch"],
            "accuracy": fid.accuracy,
            "top1_agreement": fid.top1_agreement,
            "cosine_min": round(fid.cosine_min, 5),
            "cosine_mean": round(fid.cosine_mean, 5),
            "pooled_cosine_min": None
            if fid.pooled_cosine_min is None
            else round(fid.pooled_cosine_min, 5),
            "decided_by": fid.decided_by,
            "scores": metrics.summary(fid.scores),
            "size_bytes": size.bytes,
            "gzip_bytes": size.gzip_bytes,
        }
    return found


def _timings(
    predictors: dict[str, Any],
    data: Dataset,
    batch: int,
    seconds: float,
    alone: tuple[str, ...],
    round_: int,
) -> dict[str, dict[str, Any]]:
    """One round of interleaved latency, the models' order rotated by ``round_`` so that none
    is always the one timed first; speedups against the first model of ``predictors``."""
    names = list(predictors)
    shift = round_ % len(names)
    order = names[shift:] + names[:shift]
    lat = verify.latencies({n: predictors[n] for n in order}, data, batch, seconds, alone=alone)
    cpu = _cpu_ms_per_row(predictors, order, data, {n: lat[n].batch for n in names}, seconds)
    base_ms = lat[names[0]].ms_per_row
    return {
        n: {
            "p50_ms": round(lat[n].p50_ms, 3),
            "p99_ms": round(lat[n].p99_ms, 3),
            "p50_ms_batch1": round(lat[n].p50_ms_batch1, 4),
            "speedup": round(base_ms / lat[n].ms_per_row, 3),
            "cpu_ms_per_row": round(cpu[n], 5),
            "speedup_by_cpu": round(cpu[names[0]] / cpu[n], 3),
            "batch": lat[n].batch,
        }
        for n in names
    }


def _cpu_ms_per_row(
    predictors: dict[str, Any],
    order: list[str],
    data: Dataset,
    batches: dict[str, int],
    seconds: float,
) -> dict[str, float]:
    """The process's CPU milliseconds per row of each model at the batch it was timed at, the
    models interleaved: the median of its calls. On a shared machine (this one runs niced) a
    call of several milliseconds is preempted far more often than one of a fraction of one, so
    the wall-clock ratio of a slow FP32 batch to a fast int8 one grows with the load; the CPU
    the calls spend does not (ORT's threads do not spin: waiting costs no CPU)."""
    import statistics
    import time

    feeds = {n: data.take(slice(0, batches[n])).inputs for n in order}
    spent: dict[str, list[float]] = {n: [] for n in order}
    started, round_ = time.perf_counter(), 0
    while round_ < 5 or (round_ < 200 and time.perf_counter() - started < seconds / 2):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            t0 = time.process_time()
            predictors[name].run(feeds[name], validate=False)
            spent[name].append((time.process_time() - t0) * 1000 / max(batches[name], 1))
        round_ += 1
    return {n: statistics.median(v) for n, v in spent.items()}


def optimize_on(
    source: Path,
    work: Path,
    name: str,
    calibration: dict[str, np.ndarray],
    evaluation: dict[str, np.ndarray],
    **options: Any,
) -> Any:
    """``edgebento optimize`` of ``source`` into ``work/pack``, calibrated on ``calibration``
    and judged on ``evaluation`` (both written beside it as .npz, as a user would pass them),
    with an empty cache."""
    import shutil

    from optimize import optimize_model

    # A cold search, as a user's first run: candidates cached by an earlier run would make
    # the time to the pick (and what the time budget leaves room for) a rerun's, not a user's.
    shutil.rmtree(work / "pack", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calibration.npz", **calibration)  # type: ignore[arg-type]
    np.savez(work / "eval.npz", **evaluation)  # type: ignore[arg-type]
    return optimize_model(
        source,
        work / "pack",
        name=name,
        version=1,
        data=work / "calibration.npz",
        eval_data=work / "eval.npz",
        cache=work / "cache",
        **options,
    )


def picks(chosen: list[str]) -> str:
    """The searches' picks over several runs in brief: each with how many runs chose it."""
    counts = {c: chosen.count(c) for c in dict.fromkeys(chosen)}
    if len(counts) == 1:
        return chosen[0]
    return ", ".join(f"{c} ({n} of {len(chosen)} runs)" for c, n in counts.items())


def candidate_rows(result: Any) -> list[dict[str, Any]]:
    """Each candidate of an ``optimize_model`` result in brief: speed, budget and why not."""
    return [
        {k: r[k] for k in ("candidate", "speedup", "within_budget", "violation", "error")}
        | {"decisive_value": (r["fidelity"] or {}).get("decisive_value")}
        for r in result.rows
    ]


def optimize_minilm_side_by_side(
    source: Path, work: Path, name: str, batch: int, tokens: int, **options: Any
) -> tuple[Any, dict[str, Any]]:
    """``edgebento optimize`` on MiniLM, calibrated on one set of real sentences, then FP32,
    quantize_dynamic defaults and the pack side by side on ``batch`` sentences it never saw."""
    from benchmarks import minilm

    calibration = minilm.tokenize(minilm.sentences("calibration")[:128], tokens)
    evaluation = minilm.tokenize(minilm.sentences("eval")[:batch], tokens)
    result = optimize_on(source, work, name, calibration, evaluation, **options)
    dyn = quantize_dynamic_defaults(source, work / "quantize_dynamic.onnx")
    models = {"fp32": source, "quantize_dynamic": dyn, "edgebento": work / "pack" / "model.onnx"}
    data = Dataset(evaluation, None, {k: 0 for k in evaluation})
    return result, side_by_side(models, data, batch=batch, labels=None, seconds=60)
