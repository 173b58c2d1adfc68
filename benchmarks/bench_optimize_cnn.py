"""A small Keras CNN on digits: does the search pick the right one of static QDQ, dynamic, FP32?

"Right" is judged from an independent side-by-side run of the three families' best models: the
fastest whose accuracy drop is within 1 point.

The model is trained once (set-up); then ``EDGEBENTO_BENCH_RUNS`` whole runs (3 by default)
each search and time the models side by side (the order rotated between runs). The target: every
run picks the family its own side-by-side run finds right; speeds are the runs' median and range.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_optimize_digits import _data
from benchmarks.figure import num
from benchmarks.optimize_common import (
    candidate_rows,
    picks,
    quantize_dynamic_defaults,
    side_by_side,
)
from benchmarks.runs import load, rounds, summarize
from optimize import optimize_model
from optimize.data import Dataset

WORK = Path("build/bench/cnn")


def _train(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    from optimize.convert import import_tensorflow

    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            layers.Input((8, 8, 1), name="image"),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )
    model.compile(
        tf.keras.optimizers.Adam(2e-3),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=25, batch_size=64, verbose=0)
    model.save(str(path))
    return path


def _family(name: str) -> str:
    return "static" if name.startswith("static") else ("dynamic" if "dynamic" in name else "fp32")


def run(results_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    x_train, y_train, x_test, y_test = _data()
    x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
    # Set-up, once: the model every run optimizes and the data files a user would pass.
    source = _train(x_train, y_train, WORK / "cnn.keras")
    np.savez(WORK / "train.npz", image=x_train, labels=y_train)
    np.savez(WORK / "test.npz", image=x_test, labels=y_test)
    data = Dataset({"image": x_test}, y_test, {"image": 0})
    found = [_one(source, data, r) for r in range(rounds())]
    doc = summarize(found, digits=5)  # accuracies differ in the 4th digit
    table = doc["side_by_side"]
    chosen = [f["chosen"] for f in found]
    right = sum(f["right"] for f in found)

    def speed(key: str) -> str:
        row = table.get(key, {})
        by_cpu = num(row.get("speedup_by_cpu"), ".3f", "x")
        return f"{num(row.get('speedup'), '.3f', 'x')} ({by_cpu} by CPU time)"

    return doc | {
        "headline": (
            f"search chose {picks(chosen)}; the right family (the fastest "
            f"within budget side by side) in {right} of {len(found)} runs: static "
            f"{speed('best_static')}, dynamic {speed('best_dynamic')}, quantize_dynamic "
            f"{speed('quantize_dynamic')} FP32"
        ),
        # Every run's pick must be the family its own side-by-side run finds right.
        "targets_met": right == len(found),
        "chosen": picks(chosen),
        "chosen_by_run": chosen,
        "right_runs": right,
    }


def _one(source: Path, data: Dataset, round_: int) -> dict[str, Any]:
    """One whole run: the search, then the three families' best and quantize_dynamic defaults
    side by side (order rotated by ``round_``); is the pick of the family found right?"""
    work = WORK / f"run{round_}"
    started = time.monotonic()
    result = optimize_model(
        source,
        work / "pack",
        name="cnn",
        version=1,
        data=WORK / "train.npz",
        eval_data=WORK / "test.npz",
        prune="off",
        cache=work / "cache",
        latency_seconds=30,
    )
    search_seconds = time.monotonic() - started
    fp32 = next(c for c in result.candidates if c.name == "fp32")
    assert fp32.path is not None
    models = {"fp32": fp32.path}
    models["quantize_dynamic"] = quantize_dynamic_defaults(
        fp32.path, work / "quantize_dynamic.onnx"
    )
    for family in ("dynamic", "static"):
        best = [c for c in result.candidates if _family(c.name) == family and c.within_budget]
        if best:
            pick = min(best, key=lambda c: c.latency.p50_ms if c.latency else 1e9)
            assert pick.path is not None
            models[f"best_{family}"] = pick.path
    table = side_by_side(models, data, batch=256, labels=data.labels, seconds=30, rotate=round_)
    base_acc = table["fp32"]["accuracy"]
    ok = {
        k: v
        for k, v in table.items()
        if k in ("fp32", "best_dynamic", "best_static") and base_acc - v["accuracy"] <= 0.01
    }
    right = min(ok, key=lambda k: ok[k]["p50_ms"])
    right_family = {"fp32": "fp32", "best_dynamic": "dynamic", "best_static": "static"}[right]
    chosen_family = _family(result.chosen.name)
    return {
        "chosen": result.chosen.name,
        "reason": result.reason,
        "search_seconds": round(search_seconds, 1),
        "right_family": right_family,
        "right": chosen_family == right_family,
        "side_by_side": table,
        "candidates": candidate_rows(result),
        "load": load(),  # other work on the same cores moves the timings
    }
