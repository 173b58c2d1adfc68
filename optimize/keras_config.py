"""What a zip ``.keras`` file may refer to before Keras is allowed to build it.

Keras' ``safe_mode`` refuses Lambda bytecode, but tf-keras 2.21 still resolves any other object
of a config by importing the module the config names (``{"module": "os", "class_name":
"function", "config": "system"}``) and calls ``from_config`` of any class it finds there (the
path of CVE-2025-1550 in Keras 3). A model made of Keras layers names only Keras' own modules,
so anything else is refused before TensorFlow is even imported.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError

CONFIG = "config.json"
MAX_CONFIG_BYTES = 64 << 20  # a config describes layers; a big one is not a model
KERAS_MODULES = ("keras", "tf_keras")
LAMBDAS = ("Lambda", "__lambda__")  # the layer, and the serialized lambda of Keras 3 configs


def _is_keras_module(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in KERAS_MODULES)


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


def _read_config(source: Path) -> Any:
    try:
        with zipfile.ZipFile(source) as archive:
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
        module = obj.get("module")
        if module is not None and not (isinstance(module, str) and _is_keras_module(module)):
            kind = obj.get("class_name")
            name = obj.get("config") if kind == "function" else kind
            raise ConfigError(
                f"{source.name} refers to {module}.{name}, which is not part of Keras; building"
                " it would import and run that code, so it is not loaded by default: pass"
                " --trust-model-code if you trust its author"
            )
