"""The optimize stage: prune and quantize a model into a verified ONNX ModelPack.

``optimize_model`` converts the source (ONNX, Keras, TorchScript), builds candidates (structured
and Keras pruning, dynamic and static int8 variants, sensitive nodes kept in float), verifies
each against FP32 on held-back data, picks the fastest within the budget and writes the pack
with ``report.json`` and ``report.html``.
"""

from __future__ import annotations

from optimize.pick import Budget, Candidate, Choice
from optimize.pipeline import OptimizeOptions, OptimizeResult, optimize_model

__all__ = [
    "Budget",
    "Candidate",
    "Choice",
    "OptimizeOptions",
    "OptimizeResult",
    "optimize_model",
]
