"""Transformer fusion: ONNX Runtime's transformers optimizer, as a pass before quantization.

For BERT-like graphs it fuses attention, LayerNorm (SkipLayerNormalization), GELU and the
embedding into ORT's contrib ops, which run faster in float and quantize into faster int8
kernels. The fused model is one more base: its candidates are verified like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from optimize.passes import PassConfig

log = logging.getLogger(__name__)


class FuseConfig(PassConfig):
    model_type: str = "bert"
    num_heads: int = 0  # 0: let the optimizer read it from the graph
    hidden_size: int = 0
    opt_level: int = 1  # 1: the portable fusions only; 2+ add hardware-specific layouts


def bert_like(op_types: set[str], input_names: set[str]) -> bool:
    """Token inputs, softmax attention and layer norms: what the BERT fusions look for."""
    tokens = any("input_ids" in n or n in ("tokens", "ids") for n in input_names)
    attention = {"Softmax", "MatMul"} <= op_types
    norm = "LayerNormalization" in op_types or {"ReduceMean", "Sqrt"} <= op_types
    return tokens and attention and norm


def fuse(src: Path, dst: Path, config: FuseConfig) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(src),
        model_type=config.model_type,
        num_heads=config.num_heads,
        hidden_size=config.hidden_size,
        opt_level=config.opt_level,
        use_gpu=False,
    )
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    if not fused:
        raise ValueError("the transformers optimizer found nothing to fuse")
    log.info("fused: %s", fused)
    model.save_model_to_file(str(dst))
