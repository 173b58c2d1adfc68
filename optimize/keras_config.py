"""What a zip ``.keras`` file may hold before Keras is allowed to build it.

Keras' ``safe_mode`` refuses Lambda bytecode, but it still builds whatever class a config names,
with whatever config that class accepts: tf-keras' ``TensorFlowOpLayer`` runs any TensorFlow
NodeDef (a ``DebugIdentity`` writing files where the config says), and a module outside Keras is
imported and run. So the config is read as data first and every object in it must be a layer of
tensor maths (or an initializer, regularizer, constraint or dtype policy of Keras' own) from
``optimize.keras_layers``, with only the config keys Keras itself writes for it. The weights file
is then checked to read nothing but its own bytes. Anything else needs ``--trust-model-code``.
"""

from __future__ import annotations

import io
import json
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError
from optimize import keras_layers as allowed

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS_H5 = "model.weights.h5"
WEIGHTS_NPZ = "model.weights.npz"
MAX_CONFIG_BYTES = 64 << 20  # a config describes layers; a big one is not a model
MAX_MEMBERS = 10_000  # config, metadata, weights and a model's assets
TRUST_FLAG = "--trust-model-code"
LAMBDAS = ("Lambda", "__lambda__")  # the layer, and the serialized lambda of Keras 3 configs
# Keras' modules a model is made of. Not its saving, utils, config or backend modules: they hold
# functions such as enable_unsafe_deserialization and get_file; and importing any other module
# runs its top-level code.
_MODEL_MODULES = re.compile(
    r"(tf_)?keras(\.src)?(\.(layers|engine|models|initializers|regularizers|constraints"
    r"|activations|mixed_precision|dtype_policies)(\.[A-Za-z_]\w*)*)?"
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DTYPE = re.compile(r"(mixed_)?(b?float|u?int|complex)(8|16|32|64|128)|bool")
# Keys beside "config" in a serialized object; "compile_config" is dropped by both loaders at
# the top (compile=False) and is checked like any other key below it.
_OUTER = frozenset(
    {"module", "class_name", "config", "registered_name", "build_config", "compile_config"}
    | {"name", "inbound_nodes", "shared_object_id"}
)
# Keys whose value Keras looks up by name or builds as an object of one kind.
_ROLES: tuple[tuple[str, dict[str, frozenset[str]], frozenset[str]], ...] = (
    ("_initializer", allowed.INITIALIZERS, allowed.INITIALIZER_NAMES),
    ("_regularizer", allowed.REGULARIZERS, allowed.REGULARIZER_NAMES),
    ("_constraint", allowed.CONSTRAINTS, allowed.CONSTRAINT_NAMES),
    ("activation", {"function": frozenset()}, allowed.ACTIVATIONS),
)
_FIX = f"pass {TRUST_FLAG} if you trust its author"


@dataclass(frozen=True)
class KerasArchive:
    """What the checks learned about a zip ``.keras`` file: which Keras wrote it."""

    keras_version: str

    @property
    def major(self) -> int:
        head = self.keras_version.split(".")[0]
        return int(head) if head.isdigit() else 2


def _refuse(source: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{source.name} {what}; edgebento builds only Keras layers of tensor maths (Dense, Conv,"
        f" pooling, normalization, activations, merge layers, ...) from a file by default, since"
        f" building anything else could run code: {_FIX}"
    )


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def _check_string(source: Path, key: str, value: str, path: str) -> None:
    for suffix, _tables, names in _ROLES:
        if key.endswith(suffix) and value not in names:
            raise _refuse(source, f"names {value!r} as {key}{_where(path)}")
    if key == "dtype" and not _DTYPE.fullmatch(value):
        raise _refuse(source, f"names {value!r} as a dtype{_where(path)}")


def _table_for(key: str) -> dict[str, frozenset[str]] | None:
    """The classes an object under ``key`` may be; None where any allowed class may appear."""
    for suffix, table, _names in _ROLES:
        if key.endswith(suffix):
            return table
    if key == "layers":
        return {**allowed.LAYERS, **allowed.MODELS}
    if key == "dtype":
        return allowed.PLUMBING
    return None


def _check_object(source: Path, obj: dict[str, Any], path: str, table: Any) -> None:
    kind = obj.get("class_name")
    if kind in LAMBDAS or obj.get("registered_name") in LAMBDAS:
        raise ConfigError(
            f"{source.name} holds a Lambda layer, Python code that runs when the model is built,"
            f" so it is not loaded by default; {_FIX}"
        )
    if not (isinstance(kind, str) and _IDENTIFIER.fullmatch(kind)):
        raise _refuse(source, f"names the class {kind!r}{_where(path)}")
    module = obj.get("module")
    if module is not None and not (isinstance(module, str) and _MODEL_MODULES.fullmatch(module)):
        name = obj.get("config") if kind == "function" else kind
        raise ConfigError(
            f"{source.name} refers to {module}.{name}, which is not part of Keras; building it"
            f" would import and run that code, so it is not loaded by default: {_FIX}"
        )
    if obj.get("registered_name") not in (None, kind):  # a custom object registers its own
        raise _refuse(source, f"registers {kind!r} as {obj.get('registered_name')!r}")
    outer = sorted(set(obj) - _OUTER)
    if outer:
        raise _refuse(source, f"gives its {kind} the unknown entry {outer[0]!r}{_where(path)}")
    config = obj.get("config")
    if kind == "function":  # an activation named as an object
        if (table is not None and "function" not in table) or config not in allowed.ACTIVATIONS:
            raise _refuse(source, f"names the function {config!r}{_where(path)}")
        return
    keys = (table if table is not None else allowed.ALL_CLASSES).get(kind)
    if keys is None:
        what = "object" if kind in allowed.ALL_CLASSES else "layer"  # known, in the wrong place
        raise _refuse(source, f"holds a {kind} {what}{_where(path)}")
    if config is None:
        return
    if not isinstance(config, dict):
        raise _refuse(source, f"gives its {kind} the config {type(config).__name__}")
    unknown = sorted(set(config) - keys)
    if unknown:
        raise _refuse(
            source, f"gives its {kind} the config key {unknown[0]!r}{_where(path)}, which Keras'"
            f" own {kind} does not write"
        )  # fmt: skip
    function = config.get("function")
    if kind in ("TFOpLambda", "SlicingOpLambda") and function not in allowed.TF_FUNCTIONS:
        raise _refuse(source, f"has a {kind} layer calling TensorFlow's {function!r}")


def _children(node: Any, path: str) -> Iterator[tuple[str, Any, str]]:
    """(key, value, path) of each member of a dict or list; list items keep their parent's key."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key), value, f"{path}.{key}" if path else str(key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield "", value, f"{path}[{index}]"


def check_config(source: Path, config: Any) -> None:
    """Refuse a config that names anything but the allowed Keras objects, with their keys."""
    if isinstance(config, dict) and "compile_config" in config:
        config = {k: v for k, v in config.items() if k != "compile_config"}  # compile=False
    # (key it sits under, value, path for the message), depth first, no recursion limit.
    stack: list[tuple[str, Any, str]] = [("layers", config, "")]
    while stack:
        key, node, path = stack.pop()
        if isinstance(node, str) and key:
            _check_string(source, key, node, path)
        if isinstance(node, dict) and ({"class_name", "module", "registered_name"} & set(node)):
            _check_object(source, node, path, _table_for(key))
            inner = node.get("config")
            if isinstance(inner, dict):
                stack.extend(_children(inner, path))
            stack.extend((k, v, p) for k, v, p in _children(node, path) if k != "config")
        else:  # plain data; a list's items count as sitting under the list's key
            stack.extend((k or key, v, p) for k, v, p in _children(node, path))


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


def _read_json(source: Path, archive: zipfile.ZipFile, member: str) -> Any:
    info = archive.getinfo(member)
    if info.file_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source.name}: {member} is {info.file_size} bytes; not a model")
    return json.loads(archive.read(info))


def _version(source: Path, archive: zipfile.ZipFile, config: Any) -> str:
    """The Keras version that wrote the file: its metadata says; its config's shape tells."""
    if METADATA in archive.namelist():
        metadata = _read_json(source, archive, METADATA)
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+)*\S*", version):
            return version
    text = json.dumps(config)
    return "3" if '"__keras_tensor__"' in text or '"DTypePolicy"' in text else "2"


def _check_weights(source: Path, archive: zipfile.ZipFile) -> None:
    """The weights Keras will read: an HDF5 file that reads only itself, or numeric arrays."""
    from optimize.hdf5_check import check_hdf5
    from optimize.npz import open_npz

    names = archive.namelist()
    if WEIGHTS_H5 in names:
        check_hdf5(archive.read(WEIGHTS_H5), f"{source.name}: {WEIGHTS_H5}")
    elif WEIGHTS_NPZ in names:
        with archive.open(WEIGHTS_NPZ) as member:
            arrays = open_npz(io.BytesIO(member.read()), name=f"{source.name}: {WEIGHTS_NPZ}")
        for name in arrays:
            arrays.member(name)  # headers only: numeric dtypes, sizes the members hold


def read_keras_archive(source: Path, check: bool = True) -> KerasArchive:
    """Read a zip ``.keras`` file as data; with ``check``, refuse what Keras could run."""
    try:
        with zipfile.ZipFile(source) as archive:
            _check_members(source, archive)
            config = _read_json(source, archive, CONFIG)
            if check:
                check_config(source, config)
                _check_weights(source, archive)
            return KerasArchive(_version(source, archive, config))
    except KeyError as exc:
        raise ConfigError(f"{source.name} is a zip but not a .keras model (no {CONFIG})") from exc
    except RecursionError as exc:  # nesting no Keras model has
        raise ConfigError(
            f"{source.name}: its {CONFIG} is nested too deeply to be a model"
        ) from exc
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source.name}: cannot read its {CONFIG}: {exc}") from exc


def check_keras_config(source: Path) -> KerasArchive:
    """Refuse a ``.keras`` file whose config or weights need more than data to be built."""
    return read_keras_archive(source, check=True)
