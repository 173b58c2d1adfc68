"""Sources to ONNX: an ONNX file as it is, Keras with tf2onnx, TorchScript with torch.onnx.

The build machine loads data, never programs, unless told to: ONNX and zip ``.keras`` files
(Keras' ``safe_mode``, layers of tensor maths only, weights that read only their own file; Keras 3
files built by Keras 3) load by default; HDF5 and SavedModel
Keras models (which carry Lambda-layer bytecode) and TorchScript (a program) need
``trust_model_code``. Pickled ``torch.save`` files never load.
"""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from modelpack.errors import ConfigError
from optimize import keras3
from optimize.keras_config import KerasArchive, read_keras_archive
from optimize.onnx_source import copy_onnx
from optimize.tf_import import import_tensorflow

SourceKind = Literal["onnx", "keras", "torch"]
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth")
OPSET = 17
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TRUST_FLAG = "--trust-model-code"


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


def _refuse_code(source: Path, what: str, instead: str) -> ConfigError:
    return ConfigError(
        f"{source.name} is {what}: loading it runs code stored in the file with your rights,"
        f" so it is not loaded by default; {instead}, or pass {TRUST_FLAG} if you trust its author"
    )


def _is_hdf5(source: Path) -> bool:
    """HDF5's signature sits at 0 or after a user block of 512, 1024, 2048, ... bytes."""
    with source.open("rb") as head:
        for offset in (0, 512, 1024, 2048, 4096, 8192):
            head.seek(offset)
            if head.read(8) == HDF5_MAGIC:
                return True
    return False


def _keras_path(source: Path, trust_model_code: bool, tmp: Path) -> tuple[Path, int]:
    """The path to hand to ``load_model`` and the Keras major version that wrote it: a zip
    ``.keras`` file (checked), or with trust any."""
    keep = "save it as a zip .keras file (model.save('model.keras'))"
    if source.is_dir():
        if not trust_model_code:
            raise _refuse_code(source, "a TensorFlow SavedModel directory", keep)
        return source, 2
    # What Keras itself tests to pick its safe loader; the name proves nothing.
    if zipfile.is_zipfile(source):
        archive: KerasArchive = read_keras_archive(source, check=not trust_model_code)
        if str(source).endswith(".keras"):  # the test Keras applies, case and all
            return source, archive.major
        named = tmp / "model.keras"  # a zip named .h5 would go to the HDF5 loader
        named.symlink_to(source.resolve())
        return named, archive.major
    if trust_model_code:
        return source, 2
    if _is_hdf5(source):
        raise _refuse_code(source, "an HDF5 Keras file (the legacy format)", keep)
    raise ConfigError(f"{source.name} is neither a zip .keras file nor HDF5")


def _reason(exc: BaseException) -> str:
    """The library's message up to the object config it quotes (a config cut in the middle
    helps nobody), on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for marker in (" Full object config:", " Config:", " config=", " {"):
        text = text.split(marker)[0]
    return text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " ..."


def load_keras(source: Path, trust_model_code: bool = False) -> Any:
    """A Keras model; by default only from a zip ``.keras`` file, with Keras' ``safe_mode``.

    A file saved by Keras 3 is built by Keras 3 (``optimize.keras3``), one saved by Keras 2 by
    tf-keras; both pass the same checks first.
    """
    with tempfile.TemporaryDirectory(prefix="edgebento-keras-") as tmp:
        path, major = _keras_path(source, trust_model_code, Path(tmp))
        tf = import_tensorflow()
        loader = "Keras 3" if major >= 3 else "tf-keras"
        try:
            if major >= 3:
                return keras3.load(path, trust_model_code)
            return tf.keras.models.load_model(
                str(path), compile=False, safe_mode=not trust_model_code
            )
        except ConfigError:
            raise
        except Exception as exc:  # h5py, protobuf and Keras raise their own errors
            raise ConfigError(
                f"cannot load the Keras model {source.name} with {loader}: {_reason(exc)}; save"
                " it again with the Keras that trained it (model.save('model.keras')), or export"
                " it to ONNX and pass the .onnx file"
            ) from exc


def keras_to_onnx(model: Any, dst: Path, opset: int = OPSET) -> None:
    if keras3.is_keras3(model):
        keras3.to_onnx(model, dst, opset)
        return
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


def _forward_inputs(module: Any, source: Path, example: Mapping[str, Any]) -> list[str]:
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


def torch_to_onnx(
    source: Path,
    dst: Path,
    example: Mapping[str, Any],
    opset: int = OPSET,
    trust_model_code: bool = False,
) -> None:
    """Export a TorchScript module (``torch.jit.save``); inputs named as ``forward`` names them."""
    if _is_pickled_torch_save(source):  # refused even with trust: a pickle is no model format
        raise _refuse_pickle(source)
    if not trust_model_code:
        # TorchScript is a program: loading resolves no Python globals, but running forward
        # (to name the outputs, to trace the export) does whatever its code says, such as
        # torch.from_file(path, shared=True) writing into a file of yours.
        raise _refuse_code(source, "TorchScript, a program", "export ONNX with torch.onnx.export")
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("PyTorch sources need torch: pip install 'edgebento[torch]'") from exc
    try:
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


def to_onnx(
    source: Path,
    dst: Path,
    example: Mapping[str, Any] | None,
    *,
    trust_model_code: bool = False,
) -> SourceKind:
    """Write ``source`` as ONNX to ``dst`` and return what kind of source it was.

    Formats that are programs (HDF5 and SavedModel Keras, TorchScript) load only with
    ``trust_model_code``; ONNX and zip ``.keras`` files are data and always load.
    """
    kind = source_kind(source)
    if kind == "onnx":
        copy_onnx(source, dst)
    elif kind == "keras":
        keras_to_onnx(load_keras(source, trust_model_code), dst)
    else:
        if example is None:
            raise ConfigError("a PyTorch source needs --data: the export traces real inputs")
        torch_to_onnx(source, dst, example, trust_model_code=trust_model_code)
    return kind
