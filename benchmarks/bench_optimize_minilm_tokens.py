"""all-MiniLM-L6-v2 exported as users export it: ``last_hidden_state``, no pooling in the graph.

FP32 vs quantize_dynamic defaults vs edgebento optimize, side by side, on 64 sentences x 64
tokens unseen at calibration. Fidelity is what a sentence-transformers user consumes: the mean
of the real tokens' vectors (pooled cosine), which is also the search's default deciding metric
for a sequence output of a model with an attention mask.
Target (issue 22): >= 2.0x FP32 with pooled cosine_min >= 0.99.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import minilm
from benchmarks.bench_optimize_minilm import BATCH, TOKENS, rounds, summary
from benchmarks.optimize_common import optimize_minilm_side_by_side

WORK = Path("build/bench/minilm_tokens")


def run(results_dir: Path) -> dict[str, Any]:
    source = minilm.export_minilm(Path("build/minilm"), pooled=False)
    result, table = optimize_minilm_side_by_side(
        source, WORK, "minilm-tokens", BATCH, TOKENS, latency_seconds=30, progress=False
    )
    return summary(result, rounds(source, WORK, table), "pooled_cosine_min")
