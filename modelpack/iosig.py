"""The io signature of an ONNX model, read through ONNX Runtime (no onnx package needed)."""

from __future__ import annotations

from pathlib import Path

from modelpack.errors import ModelInvalidError
from modelpack.manifest import Dim, TensorSpec

# ONNX Runtime's type strings to numpy dtype names.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _spec(arg: object) -> TensorSpec:
    name = arg.name  # type: ignore[attr-defined]
    ort_type = arg.type  # type: ignore[attr-defined]
    if ort_type not in ORT_TYPES:
        raise ModelInvalidError(f"{name}: type {ort_type} is not supported (only plain tensors)")
    shape = arg.shape  # type: ignore[attr-defined]
    dims: list[Dim] | None = None
    if shape is not None:
        # "?" (as paddle2onnx writes every free dim) names no symbol: two "?" dims are not
        # the same size, so they are read as unnamed.
        dims = [
            d
            if isinstance(d, int) and d >= 0
            else (d if isinstance(d, str) and d.strip("?") else None)
            for d in shape
        ]
    return TensorSpec(name=name, dtype=ORT_TYPES[ort_type], shape=dims)


def read_io_signature(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelInvalidError(f"ONNX Runtime cannot load {model_path.name}: {exc}") from exc
    return [_spec(a) for a in session.get_inputs()], [_spec(a) for a in session.get_outputs()]
