"""all-MiniLM-L6-v2 exported as users export it: ``last_hidden_state``, no pooling in the graph.

FP32 vs quantize_dynamic defaults vs edgebento optimize, side by side, on 64 sentences x 64
tokens unseen at calibration. Fidelity is what a sentence-transformers user consumes: the mean
of the real tokens' vectors (pooled cosine), which is also the search's default deciding metric
for a sequence output of a model with an attention mask.
Target: >= 1.8x FP32 (aim 2.0x) with pooled cosine_min >= 0.99.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import minilm
from benchmarks.optimize_common import optimize_minilm_side_by_side

WORK = Path("build/bench/minilm_tokens")
BATCH = 64
TOKENS = 64


def run(results_dir: Path) -> dict[str, Any]:
    source = minilm.export_minilm(Path("build/minilm"), pooled=False)
    result, table = optimize_minilm_side_by_side(
        source,
        WORK,
        "minilm-tokens",
        BATCH,
        TOKENS,
        latency_seconds=30,
        progress=False,
        time_budget=900,
    )
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
