"""A Keras MLP on scikit-learn's digits: FP32 vs quantize_dynamic defaults vs edgebento optimize.

Targets: accuracy drop <= 1 point and gzip size <= 0.15x FP32 for the chosen model, and
latency <= 0.5x FP32 for the best candidate with ONNX structured pruning.

The model is trained once (set-up); then ``EDGEBENTO_BENCH_RUNS`` whole runs (3 by default)
each search and time the models side by side (the order rotated between runs). Every figure is
the median of the runs with its range; the targets are judged on the medians.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.figure import num
from benchmarks.optimize_common import (
    candidate_rows,
    picks,
    quantize_dynamic_defaults,
    side_by_side,
)
from benchmarks.runs import load, median_of, rounds, summarize
from optimize import optimize_model
from optimize.data import Dataset

WORK = Path("build/bench/digits")
HIDDEN = 512


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


def _train(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    from optimize.convert import import_tensorflow

    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((64,), name="x"),
            tf.keras.layers.Dense(HIDDEN, activation="relu"),
            tf.keras.layers.Dense(HIDDEN, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    model.compile(
        tf.keras.optimizers.Adam(1e-3),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=40, batch_size=64, verbose=0)
    model.save(str(path))
    return path


def run(results_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    x_train, y_train, x_test, y_test = _data()
    # Set-up, once: the model every run optimizes and the data files a user would pass.
    source = _train(x_train, y_train, WORK / "digits.keras")
    np.savez(WORK / "train.npz", x=x_train, labels=y_train)
    np.savez(WORK / "test.npz", x=x_test, labels=y_test)
    data = Dataset({"x": x_test}, y_test, {"x": 0})
    found = [_one(source, data, r) for r in range(rounds())]
    doc = summarize(found, digits=5)  # accuracies differ in the 4th digit
    eb = doc["side_by_side"]["edgebento"]
    drop, gzip_ratio = median_of(doc["accuracy_drop_points"]), median_of(doc["gzip_ratio"])
    prune_ratio = doc.get("structured_pruned_latency_ratio")
    met = (
        drop <= 1.0
        and gzip_ratio <= 0.15
        and prune_ratio is not None
        and median_of(prune_ratio) <= 0.5
    )
    chosen = [f["chosen"] for f in found]
    return doc | {
        "headline": (
            f"chosen {picks(chosen)}: acc drop {num(drop, '.2f')} pt, gzip "
            f"{num(gzip_ratio, '.3f')}x FP32, {num(eb['speedup'], '.2f', 'x')} faster "
            f"({num(eb.get('speedup_by_cpu'), '.2f', 'x')} by CPU time); "
            "structured-pruned latency "
            + (num(prune_ratio, ".2f", "x") + " FP32" if prune_ratio is not None else "n/a")
            + f"; median of {len(found)} runs (search and side by side each)"
        ),
        "targets_met": met,
        "target": "judged on the median of the runs",
        "chosen": picks(chosen),
        "chosen_by_run": chosen,
        "batch": len(x_test),
    }


def _one(source: Path, data: Dataset, round_: int) -> dict[str, Any]:
    """One whole run: the search, then FP32, quantize_dynamic defaults, the pick and the
    fastest structured-pruned candidate side by side (order rotated by ``round_``)."""
    work = WORK / f"run{round_}"
    started = time.monotonic()
    result = optimize_model(
        source,
        work / "pack",
        name="digits",
        version=1,
        data=WORK / "train.npz",
        eval_data=WORK / "test.npz",
        train_data=WORK / "train.npz",
        cache=work / "cache",
        latency_seconds=20,
    )
    search_seconds = time.monotonic() - started
    fp32 = next(c for c in result.candidates if c.name == "fp32")
    assert fp32.path is not None
    shutil.copyfile(fp32.path, work / "fp32.onnx")
    dyn = quantize_dynamic_defaults(work / "fp32.onnx", work / "quantize_dynamic.onnx")
    pruned = [
        c
        for c in result.candidates
        if "prune-" in c.name and c.within_budget and c.path is not None and c.latency
    ]
    models = {
        "fp32": work / "fp32.onnx",
        "quantize_dynamic": dyn,
        "edgebento": work / "pack" / "model.onnx",
    }
    best_pruned = (
        min(pruned, key=lambda c: c.latency.p50_ms if c.latency else 0.0) if pruned else None
    )
    if best_pruned is not None and best_pruned.path is not None:
        models["best_structured_pruned"] = best_pruned.path
    table = side_by_side(
        models, data, batch=data.rows, labels=data.labels, seconds=20, rotate=round_
    )
    fp, eb = table["fp32"], table["edgebento"]
    found = {
        "chosen": result.chosen.name,
        "reason": result.reason,
        "search_seconds": round(search_seconds, 1),
        "best_structured_pruned": best_pruned.name if best_pruned else None,
        "accuracy_drop_points": round((fp["accuracy"] - eb["accuracy"]) * 100, 3),
        "gzip_ratio": round(eb["gzip_bytes"] / fp["gzip_bytes"], 4),
        "side_by_side": table,
        "candidates": candidate_rows(result),
        "load": load(),  # other work on the two cores moves FP32's two-thread batch most
    }
    if "best_structured_pruned" in table:
        ratio = table["best_structured_pruned"]["p50_ms"] / fp["p50_ms"]
        found["structured_pruned_latency_ratio"] = round(ratio, 3)
    return found
