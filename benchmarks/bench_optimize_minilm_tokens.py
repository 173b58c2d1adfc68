"""all-MiniLM-L6-v2 exported as users export it: ``last_hidden_state``, no pooling in the graph.

FP32 vs quantize_dynamic defaults vs edgebento optimize, side by side, on 64 sentences x 64
tokens unseen at calibration. Fidelity is what a sentence-transformers user consumes: the mean
of the real tokens' vectors (pooled cosine), which is also the search's default deciding metric
for a sequence output of a model with an attention mask.
Target: >= 1.8x FP32 (aim 2.0x) with pooled cosine_min >= 0.99.
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

WORK = Path("build/bench/minilm_tokens")
BATCH = 64
TOKENS = 64


def run(results_dir: Path) -> dict[str, Any]:
    source = minilm.export_minilm(Path("build/minilm"), pooled=False)
    shutil.rmtree(WORK / "pack", ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    calibration = minilm.tokenize(minilm.sentences("calibration")[:128], TOKENS)
    evaluation = minilm.tokenize(minilm.sentences("eval")[:BATCH], TOKENS)
    np.savez(WORK / "calibration.npz", **calibration)  # type: ignore[arg-type]
    np.savez(WORK / "eval.npz", **evaluation)  # type: ignore[arg-type]
    result = optimize_model(
        source,
        WORK / "pack",
        name="minilm-tokens",
        version=1,
        data=WORK / "calibration.npz",
        eval_data=WORK / "eval.npz",
        cache=WORK / "cache",
        latency_seconds=30,
        progress=False,
        time_budget=900,
    )
    dyn = quantize_dynamic_defaults(source, WORK / "quantize_dynamic.onnx")
    models = {"fp32": source, "quantize_dynamic": dyn, "edgebento": WORK / "pack" / "model.onnx"}
    data = Dataset(evaluation, None, {k: 0 for k in evaluation})
    table = side_by_side(models, data, batch=BATCH, labels=None, seconds=60)
    eb = table["edgebento"]
    pooled = eb["pooled_cosine_min"]
    return {
        "headline": (
            f"edgebento {eb['speedup']:.2f}x FP32 at pooled cosine_min {pooled:.4f} "
            f"(masked token cosine_min {eb['cosine_min']:.4f}; quantize_dynamic: "
            f"{table['quantize_dynamic']['speedup']:.2f}x at "
            f"{table['quantize_dynamic']['pooled_cosine_min']:.4f}); chosen {result.chosen.name}"
        ),
        "targets_met": eb["speedup"] >= 1.8 and pooled >= 0.99,
        "chosen": result.chosen.name,
        "reason": result.reason,
        "batch": f"{BATCH} sentences x {TOKENS} tokens",
        "side_by_side": table,
        "candidates": [
            {k: r[k] for k in ("candidate", "speedup", "within_budget", "violation", "error")}
            | {"decisive_value": (r["fidelity"] or {}).get("decisive_value")}
            for r in result.rows
        ],
    }
