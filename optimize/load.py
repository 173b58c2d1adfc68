"""Load and normalize: one ONNX file every later pass can work on, dynamic dims kept dynamic.

The normalized model is where the passes start, never what a FP32 pick packs: that is the
source as given (``keep_source``). Normalizing changes the graph, not its function: the opset
upgrade rewrites some ops (opset 11's Softmax becomes Flatten, Softmax and a Reshape to the
input's shape), shape inference adds a value_info per tensor, and unnamed nodes get names.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from optimize.passes import PassConfig

log = logging.getLogger(__name__)

# Per-channel QDQ needs axis on QuantizeLinear/DequantizeLinear, which opset 13 added.
MIN_OPSET = 13


class SourceConfig(PassConfig):
    """The FP32 candidate: nothing to set, the source's ONNX is kept as it is."""


class NormalizeConfig(PassConfig):
    min_opset: int = MIN_OPSET
    infer_shapes: bool = True


def opset_of(model: object) -> int:
    for entry in model.opset_import:  # type: ignore[attr-defined]
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _name_nodes(model: object) -> None:
    """Node exclusion and per-node error need names; exporters often leave them empty."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):  # type: ignore[attr-defined]
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def _upgrade(model: Any, target: int) -> Any:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, target)  # type: ignore[arg-type]
    except Exception as exc:  # the converter has no adapter for some ops: keep the old opset
        log.info("opset upgrade to %d failed (%s); keeping opset %d", target, exc, opset_of(model))
        return model


def _infer(model: Any) -> Any:
    """ONNX shape inference, falling back to the model as it is when it fails."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)  # type: ignore[arg-type]
    except Exception as exc:  # custom ops, broken value_info: the passes cope without shapes
        log.info("shape inference failed (%s); going on without inferred shapes", exc)
        return model


def normalize(src: Path, dst: Path, config: NormalizeConfig) -> None:
    import onnx

    model = onnx.load(str(src))
    _name_nodes(model)
    if 0 < opset_of(model) < config.min_opset:
        model = _upgrade(model, config.min_opset)
    if config.infer_shapes:
        model = _infer(model)
    onnx.save(model, str(dst))


def keep_source(src: Path, dst: Path, config: SourceConfig) -> None:
    """The FP32 candidate, and what a FP32 pick packs: the ONNX of the user's model byte for
    byte (an ONNX source's own bytes, external data inlined). What the user measured is what
    the devices run, and nothing the passes needed rides along. Refused (the pass fails) where
    the model fails onnx.checker, which ``load_pack`` runs on every pack's model."""
    import onnx

    onnx.checker.check_model(str(src))
    shutil.copyfile(src, dst)
