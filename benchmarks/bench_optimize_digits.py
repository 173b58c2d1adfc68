"""A Keras MLP on scikit-learn's digits: FP32 vs quantize_dynamic defaults vs edgebento optimize.

Targets: accuracy drop <= 1 point and gzip size <= 0.15x FP32 for the chosen model, and
latency <= 0.5x FP32 for the best candidate with ONNX structured pruning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.optimize_common import quantize_dynamic_defaults, side_by_side
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
    source = _train(x_train, y_train, WORK / "digits.keras")
    np.savez(WORK / "train.npz", x=x_train, labels=y_train)
    np.savez(WORK / "test.npz", x=x_test, labels=y_test)
    result = optimize_model(
        source,
        WORK / "pack",
        name="digits",
        version=1,
        data=WORK / "train.npz",
        eval_data=WORK / "test.npz",
        train_data=WORK / "train.npz",
        cache=WORK / "cache",
        latency_seconds=20,
    )
    fp32 = next(c for c in result.candidates if c.name == "fp32")
    assert fp32.path is not None
    shutil.copyfile(fp32.path, WORK / "fp32.onnx")
    dyn = quantize_dynamic_defaults(WORK / "fp32.onnx", WORK / "quantize_dynamic.onnx")
    pruned = [
        c
        for c in result.candidates
        if "prune-" in c.name and c.within_budget and c.path is not None and c.latency
    ]
    models = {
        "fp32": WORK / "fp32.onnx",
        "quantize_dynamic": dyn,
        "edgebento": WORK / "pack" / "model.onnx",
    }
    best_pruned = (
        min(pruned, key=lambda c: c.latency.p50_ms if c.latency else 0.0) if pruned else None
    )
    if best_pruned is not None and best_pruned.path is not None:
        models["best_structured_pruned"] = best_pruned.path
    data = Dataset({"x": x_test}, y_test, {"x": 0})
    table = side_by_side(models, data, batch=len(x_test), labels=y_test, seconds=20)
    fp, eb = table["fp32"], table["edgebento"]
    drop = (fp["accuracy"] - eb["accuracy"]) * 100
    gzip_ratio = eb["gzip_bytes"] / fp["gzip_bytes"]
    prune_ratio = (
        table["best_structured_pruned"]["p50_ms"] / fp["p50_ms"]
        if "best_structured_pruned" in table
        else None
    )
    met = drop <= 1.0 and gzip_ratio <= 0.15 and prune_ratio is not None and prune_ratio <= 0.5
    return {
        "headline": (
            f"chosen {result.chosen.name}: acc drop {drop:.2f} pt, gzip {gzip_ratio:.3f}x FP32, "
            f"{eb['speedup']:.2f}x faster; structured-pruned latency "
            + (f"{prune_ratio:.2f}x FP32" if prune_ratio is not None else "n/a")
        ),
        "targets_met": met,
        "chosen": result.chosen.name,
        "reason": result.reason,
        "best_structured_pruned": best_pruned.name if best_pruned else None,
        "accuracy_drop_points": round(drop, 3),
        "gzip_ratio": round(gzip_ratio, 4),
        "structured_pruned_latency_ratio": None if prune_ratio is None else round(prune_ratio, 3),
        "batch": len(x_test),
        "side_by_side": table,
        "candidates": result.rows,
    }
