"""What a zip ``.keras`` file may refer to before Keras is allowed to build it.

Keras' ``safe_mode`` refuses Lambda bytecode, but tf-keras 2.21 still resolves any other object
of a config by importing the module the config names (``{"module": "os", "class_name":
"function", "config": "system"}``) and calls ``from_config`` of any class it finds there (the
path of CVE-2025-1550 in Keras 3). A model made of Keras layers names only Keras' own modules,
so anything else is refused before TensorFlow is even imported.
"""

from __future__ import annotations

import json
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError

CONFIG = "config.json"
MAX_CONFIG_BYTES = 64 << 20  # a config describes layers; a big one is not a model
MAX_MEMBERS = 10_000  # config, metadata, weights and a model's assets
KERAS_MODULES = ("keras", "tf_keras")
LAMBDAS = ("Lambda", "__lambda__")  # the layer, and the serialized lambda of Keras 3 configs
# Keras' modules a model is made of. Not its saving, utils, config or backend modules: they hold
# functions such as enable_unsafe_deserialization and get_file that a config could name.
_MODEL_MODULES = re.compile(
    r"(tf_)?keras(\.src)?(\.(layers|engine|models|initializers|regularizers|constraints"
    r"|activations|losses|metrics|optimizers|mixed_precision|premade_models)(\.[A-Za-z_]\w*)*)?"
)
# A class or function name is looked up as an attribute: "layers.Lambda" under module "keras"
# resolves keras.layers.Lambda, past a check on the name "Lambda" alone.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Layers that call a TensorFlow function named in the config (``x + 1.0`` saves as TFOpLambda
# "__operators__.add"); only these namespaces of pure tensor maths may be named.
_OP_LAYERS = {
    "TFOpLambda": ("function",),
    "SlicingOpLambda": ("function",),
    "ClassMethod": ("cls_symbol", "method_name"),
    "InstanceMethod": ("method_name",),
    "InstanceProperty": ("attr_name",),
}
_TF_SYMBOL = re.compile(
    r"(tf\.)?((__operators__|math|nn|linalg|image|signal|bitwise|dtypes)\.)?[A-Za-z_][A-Za-z0-9_]*"
)
# Top-level TensorFlow functions that touch files, load libraries or run Python: never maths.
_TF_REFUSED = {
    "print", "py_function", "numpy_function", "load_library", "load_op_library", "py_func",
    "function", "init_scope", "make_template", "Variable", "Module", "saved_model",
    "write_file", "read_file", "io", "compat", "raw_ops", "debugging", "summary", "data",
}  # fmt: skip


def _is_keras_module(module: str) -> bool:
    return bool(_MODEL_MODULES.fullmatch(module))


def _refuse(source: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{source.name} {what}, which is not part of a Keras model; building it could run"
        " code, so it is not loaded by default: pass --trust-model-code if you trust its author"
    )


def _check_names(source: Path, obj: dict[str, Any]) -> None:
    kind = obj.get("class_name")
    if "class_name" in obj and ("module" in obj or "registered_name" in obj):
        registered = obj.get("registered_name")
        if registered in LAMBDAS:
            raise _refuse(source, f"registers {kind!r} as {registered!r}")
        if not (isinstance(kind, str) and _IDENTIFIER.fullmatch(kind)):
            raise _refuse(source, f"names the class {kind!r}")
        inner = obj.get("config")
        if kind == "function" and not (isinstance(inner, str) and _IDENTIFIER.fullmatch(inner)):
            raise _refuse(source, f"names the function {inner!r}")
    fields = _OP_LAYERS.get(kind) if isinstance(kind, str) else None
    config = obj.get("config")
    if fields and isinstance(config, dict):
        for field in fields:
            symbol = config.get(field)
            if not isinstance(symbol, str) or not _TF_SYMBOL.fullmatch(symbol):
                raise _refuse(source, f"has a {kind} layer calling TensorFlow's {symbol!r}")
            if symbol.removeprefix("tf.").split(".")[0] in _TF_REFUSED:
                raise _refuse(source, f"has a {kind} layer calling TensorFlow's {symbol!r}")


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict of the config, depth first, without recursion limits on deep nesting."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_members(source: Path, archive: zipfile.ZipFile) -> None:
    """Keras extracts every member of a .keras file with more than three to a temporary
    directory, and reads its weights into memory: the sizes the zip declares (which zipfile
    never reads past) are capped before that, and names a Keras file never has are refused."""
    from optimize.npz import LIMIT_ENV, data_limit

    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"{source.name} holds {len(members)} files; not a Keras model")
    for info in members:
        name = info.filename
        mode = info.external_attr >> 16
        if name.startswith("/") or "\\" in name or ".." in name.split("/"):
            raise ConfigError(f"{source.name} holds {name!r}, a path out of the archive")
        if stat.S_ISLNK(mode):
            raise ConfigError(f"{source.name} holds {name!r}, a symbolic link")
    total = sum(i.file_size for i in members)
    cap = data_limit()
    if total > cap:
        raise ConfigError(
            f"{source.name} unpacks to {total} bytes, past the {cap}-byte cap; set {LIMIT_ENV}"
            " to raise it"
        )


def _read_config(source: Path) -> Any:
    try:
        with zipfile.ZipFile(source) as archive:
            _check_members(source, archive)
            info = archive.getinfo(CONFIG)
            if info.file_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{source.name}: {CONFIG} is {info.file_size} bytes; not a model")
            return json.loads(archive.read(info))
    except KeyError as exc:
        raise ConfigError(f"{source.name} is a zip but not a .keras model (no {CONFIG})") from exc
    except RecursionError as exc:  # nesting no Keras model has
        raise ConfigError(
            f"{source.name}: its {CONFIG} is nested too deeply to be a model"
        ) from exc
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source.name}: cannot read its {CONFIG}: {exc}") from exc


def check_keras_config(source: Path) -> None:
    """Refuse a ``.keras`` file whose config needs code from outside Keras to be built."""
    objects = list(_objects(_read_config(source)))
    if any(obj.get("class_name") in LAMBDAS for obj in objects):
        raise ConfigError(
            f"{source.name} holds a Lambda layer, Python code that runs when the model is built,"
            " so it is not loaded by default; pass --trust-model-code if you trust its author"
        )
    for obj in objects:
        _check_names(source, obj)
        module = obj.get("module")
        if module is not None and not (isinstance(module, str) and _is_keras_module(module)):
            kind = obj.get("class_name")
            name = obj.get("config") if kind == "function" else kind
            raise ConfigError(
                f"{source.name} refers to {module}.{name}, which is not part of Keras; building"
                " it would import and run that code, so it is not loaded by default: pass"
                " --trust-model-code if you trust its author"
            )
