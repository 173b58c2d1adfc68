"""all-MiniLM-L6-v2: FP32 vs quantize_dynamic defaults vs edgebento optimize.

Batches of 64 sentences x 64 tokens, calibrated on one set of real sentences and measured on
another. Target: >= 1.7x faster than FP32 with pooled cosine_min >= 0.99.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import minilm
from benchmarks.optimize_common import optimize_minilm_side_by_side

WORK = Path("build/bench/minilm")
BATCH = 64
TOKENS = 64


def run(results_dir: Path) -> dict[str, Any]:
    source = minilm.export_minilm(Path("build/minilm"))
    result, table = optimize_minilm_side_by_side(
        source, WORK, "minilm", BATCH, TOKENS, latency_seconds=60
    )
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
