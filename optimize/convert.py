"""Sources to ONNX: an ONNX file as it is, Keras with tf2onnx, TorchScript with torch.onnx."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _native_stderr_held():
        import tensorflow as tf
    return tf


@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """TensorFlow 2.21 logs start-up lines (oneDNN, CUDA drivers, absl) from C++ straight to file
    descriptor 2 before its log level applies (tensorflow/tensorflow#100442), so only the
    descriptor can be redirected; what was held is shown after all if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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


def _is_pickled_torch_save(source: Path) -> bool:
    """A ``torch.save`` zip holds ``data.pkl`` but no TorchScript code; looking runs nothing."""
    with source.open("rb") as head:
        if head.read(1) == b"\x80":  # the PROTO opcode: a bare pickle (the legacy format)
            return True
    try:
        with zipfile.ZipFile(source) as archive:
            parts = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return "data.pkl" in parts and "constants.pkl" not in parts


def _refuse_pickle(source: Path) -> ConfigError:
    return ConfigError(
        f"{source.name} is a pickled torch.save file, not TorchScript; unpickling can run any"
        " code, so it is not loaded: save it with torch.jit.save(torch.jit.script(model))"
    )


def _forward_inputs(module: Any, source: Path, example: dict[str, Any]) -> list[str]:
    """The ``forward`` parameters the data feeds, in call order, so no input is swapped."""
    params = module.forward.schema.arguments[1:]  # [0] is self
    names: list[str] = []
    for arg in params:
        if arg.name in example:
            names.append(arg.name)
        elif not arg.has_default_value():
            raise ConfigError(
                f"{source.name}: forward takes {', '.join(a.name for a in params)};"
                f" the data has no array {arg.name!r} (it holds {', '.join(example)})"
            )
        else:  # an optional parameter left out: it and those after it keep their defaults
            break
    return names


def _output_names(module: Any, args: tuple[Any, ...]) -> list[str]:
    """TorchScript outputs have no names; the exporter would call them "9": name them."""
    import torch

    with torch.no_grad():
        result = module(*args)
    count = len(result) if isinstance(result, tuple | list) else 1
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def torch_to_onnx(source: Path, dst: Path, example: dict[str, Any], opset: int = OPSET) -> None:
    """Export a TorchScript module (``torch.jit.save``); inputs named as ``forward`` names them."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("PyTorch sources need torch: pip install 'edgebento[torch]'") from exc
    if _is_pickled_torch_save(source):
        raise _refuse_pickle(source)
    try:  # torch.jit.load reads TorchScript only: its unpickler resolves no Python globals
        module = torch.jit.load(str(source), map_location="cpu").eval()
    except Exception as exc:
        raise ConfigError(
            f"{source.name} is not a TorchScript file; save it with torch.jit.save or export ONNX"
        ) from exc
    names = _forward_inputs(module, source, example)
    # One row traces the graph; scalar inputs have no rows and no batch axis.
    args = tuple(torch.from_numpy(example[n][:1] if example[n].ndim else example[n]) for n in names)
    try:
        outputs = _output_names(module, args)
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is the one that takes a ScriptModule; its deprecation
            # notices would only confuse a user of this command.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(dst),
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names if example[n].ndim},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # shape and dtype mismatches surface as RuntimeError from torch
        shapes = ", ".join(f"{n} {example[n].dtype}{list(example[n].shape)}" for n in names)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot export {source.name} to ONNX with {shapes}: {reason}") from exc


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
