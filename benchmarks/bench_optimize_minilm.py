"""all-MiniLM-L6-v2: FP32 vs quantize_dynamic defaults vs edgebento optimize.

Batches of 64 sentences x 64 tokens, calibrated on one set of real sentences and measured on
another. Target: >= 1.7x faster than FP32 with pooled cosine_min >= 0.99.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import minilm
from benchmarks.optimize_common import quantize_dynamic_defaults, side_by_side
from optimize import optimize_model
from optimize.data import Dataset

WORK = Path("build/bench/minilm")
BATCH = 64
TOKENS = 64


def run(results_dir: Path) -> dict[str, Any]:
    source = minilm.export_minilm(Path("build/minilm"))
    shutil.rmtree(WORK / "pack", ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    calibration = minilm.tokenize(minilm.sentences("calibration")[:128], TOKENS)
    evaluation = minilm.tokenize(minilm.sentences("eval")[:BATCH], TOKENS)
    np.savez(WORK / "calibration.npz", **calibration)  # type: ignore[arg-type]
    np.savez(WORK / "eval.npz", **evaluation)  # type: ignore[arg-type]
    result = optimize_model(
        source,
        WORK / "pack",
        name="minilm",
        version=1,
        data=WORK / "calibration.npz",
        eval_data=WORK / "eval.npz",
        cache=WORK / "cache",
        latency_seconds=60,
    )
    dyn = quantize_dynamic_defaults(source, WORK / "quantize_dynamic.onnx")
    models = {"fp32": source, "quantize_dynamic": dyn, "edgebento": WORK / "pack" / "model.onnx"}
    data = Dataset(evaluation, None, {k: 0 for k in evaluation})
    table = side_by_side(models, data, batch=BATCH, labels=None, seconds=60)
    eb = table["edgebento"]
    met = eb["speedup"] >= 1.7 and eb["cosine_min"] >= 0.99
    return {
        "headline": (
            f"edgebento {eb['speedup']:.2f}x FP32 at cosine_min {eb['cosine_min']:.4f} "
            f"(quantize_dynamic: {table['quantize_dynamic']['speedup']:.2f}x at "
            f"{table['quantize_dynamic']['cosine_min']:.4f}); chosen {result.chosen.name}"
        ),
        "targets_met": met,
        "chosen": result.chosen.name,
        "reason": result.reason,
        "batch": f"{BATCH} sentences x {TOKENS} tokens",
        "side_by_side": table,
        "candidates": result.rows,
    }
