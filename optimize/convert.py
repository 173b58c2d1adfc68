"""Sources to ONNX: an ONNX file as it is, Keras with tf2onnx, TorchScript with torch.onnx."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from modelpack.errors import ConfigError

SourceKind = Literal["onnx", "keras", "torch"]
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth")
OPSET = 17


def source_kind(source: Path) -> SourceKind:
    if not source.exists():
        raise ConfigError(f"{source} does not exist")
    if source.is_dir():
        if (source / "saved_model.pb").exists():
            return "keras"
        raise ConfigError(f"{source} is a directory but not a SavedModel (no saved_model.pb)")
    suffix = source.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise ConfigError(
        f"{source.name}: unknown model type; give .onnx, .keras/.h5, a SavedModel dir or a TorchScript .pt"
    )


def import_tensorflow() -> Any:
    # tfmot works with Keras 2 only: tf-keras, chosen before TensorFlow is first imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def load_keras(source: Path) -> Any:
    tf = import_tensorflow()
    try:
        if source.is_dir():
            return tf.keras.models.load_model(str(source), compile=False)
        return tf.keras.models.load_model(str(source), compile=False)
    except Exception as exc:  # h5py, protobuf and Keras raise their own errors
        raise ConfigError(f"cannot load the Keras model {source.name}: {exc}") from exc


def keras_to_onnx(model: Any, dst: Path, opset: int = OPSET) -> None:
    tf = import_tensorflow()
    import tf2onnx

    signature = [
        tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name.split(":")[0])
        for tensor in model.inputs
    ]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    dst.write_bytes(proto.SerializeToString())


def torch_to_onnx(source: Path, dst: Path, example: dict[str, Any], opset: int = OPSET) -> None:
    """Export a TorchScript module (``torch.jit.save``); inputs named as in ``example``."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("PyTorch sources need torch: pip install 'edgebento[bench]'") from exc
    try:
        module = torch.jit.load(str(source), map_location="cpu").eval()
    except Exception as exc:  # only TorchScript: unpickling a module would run arbitrary code
        raise ConfigError(
            f"{source.name} is not a TorchScript file; save it with torch.jit.save or export ONNX"
        ) from exc
    names = list(example)
    args = tuple(torch.from_numpy(example[n][:1]) for n in names)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(dst),
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
            opset_version=opset,
            dynamo=False,
        )


def to_onnx(source: Path, dst: Path, example: dict[str, Any] | None) -> SourceKind:
    """Write ``source`` as ONNX to ``dst`` and return what kind of source it was."""
    kind = source_kind(source)
    if kind == "onnx":
        dst.write_bytes(source.read_bytes())
    elif kind == "keras":
        keras_to_onnx(load_keras(source), dst)
    else:
        if example is None:
            raise ConfigError("a PyTorch source needs --data: the export traces real inputs")
        torch_to_onnx(source, dst, example)
    return kind
