"""A zip ``.keras`` file's config is checked before TensorFlow ever sees it (no TF needed here)."""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.errors import ConfigError
from optimize.keras_config import check_keras_config

DENSE = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}


def _keras(path: Path, config: Any, raw: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", raw if raw is not None else json.dumps(config))
        archive.writestr("metadata.json", "{}")
    return path


def _model(*layers: Any) -> dict[str, Any]:
    return {"module": "keras", "class_name": "Sequential", "config": {"layers": list(layers)}}


def test_keras_own_objects_pass(tmp_path: Path) -> None:
    check_keras_config(
        _keras(tmp_path / "m.keras", _model(DENSE, {**DENSE, "module": "tf_keras.layers"}))
    )


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        ({"module": "os", "class_name": "function", "config": "system"}, "refers to os.system"),
        ({"module": "builtins", "class_name": "function", "config": "eval"}, "builtins.eval"),
        ({"module": "subprocess", "class_name": "Popen", "config": {}}, "subprocess.Popen"),
        ({"module": "kerasx.layers", "class_name": "Dense", "config": {}}, "kerasx.layers.Dense"),
        ({"module": ["keras"], "class_name": "Dense", "config": {}}, "not part of Keras"),
        ({"class_name": "__lambda__", "config": {"value": "4wEA"}}, "holds a Lambda layer"),
        ({"module": "keras.layers", "class_name": "Lambda", "config": {}}, "holds a Lambda layer"),
    ],
)
def test_code_from_outside_keras_is_refused_wherever_it_hides(
    tmp_path: Path, obj: dict[str, Any], says: str
) -> None:
    # Deep inside a layer's config, as an activation would be.
    hidden = {**DENSE, "config": {"units": 2, "activation": obj}}
    with pytest.raises(ConfigError, match=says):
        check_keras_config(_keras(tmp_path / "m.h5", _model(DENSE, hidden)))


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{not json", "cannot read its config.json"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|cannot read"),
    ],
)
def test_a_broken_config_is_one_clear_error(tmp_path: Path, raw: bytes, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        check_keras_config(_keras(tmp_path / "m.keras", None, raw))


def test_a_zip_without_a_config_is_not_a_keras_model(tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.h5", b"")
    with pytest.raises(ConfigError, match=r"is a zip but not a \.keras model"):
        check_keras_config(path)


# Keys the check gives a meaning to, beside junk; strings that are real class, module and
# activation names as well as random text.
KEYS = st.sampled_from(
    [
        "module",
        "class_name",
        "config",
        "registered_name",
        "layers",
        "activation",
        "dtype",
        "kernel_initializer",
        "inbound_nodes",
        "compile_config",
        "units",
        "x",
    ]
)
NAMES = st.sampled_from(["Dense", "Sequential", "keras.layers", "keras", "relu", "float32", "os"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | NAMES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=30,
)


@given(config=JSON)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_config_naming_a_module_outside_keras_or_a_lambda_never_passes(
    tmp_path: Path, config: Any
) -> None:
    """Whatever the shape, a module outside Keras or a Lambda is refused, with one ConfigError
    (never another exception); what passes is checked further in test_keras_layers.py."""

    def modules(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [node.get("module")] + [m for v in node.values() for m in modules(v)]
        if isinstance(node, list):
            return [m for v in node for m in modules(v)]
        return []

    def lambdas(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("class_name") in ("Lambda", "__lambda__") or any(
                lambdas(v) for v in node.values()
            )
        return isinstance(node, list) and any(lambdas(v) for v in node)

    # The optimizer state beside the model (compile_config) is never loaded (compile=False), so
    # it is not checked: only what the loader builds counts.
    built = (
        {k: v for k, v in config.items() if k != "compile_config"}
        if isinstance(config, dict)
        else config
    )
    found = [m for m in modules(built) if m is not None]
    safe = not lambdas(built) and all(
        isinstance(m, str) and (m.split(".")[0] in ("keras", "tf_keras")) for m in found
    )
    path = _keras(tmp_path / "m.keras", config)
    if not safe:
        with pytest.raises(ConfigError):
            check_keras_config(path)
    else:  # may be refused for another reason (an unknown class or key), never crash
        with contextlib.suppress(ConfigError):
            check_keras_config(path)


OP_ADD = {
    "module": "tf_keras.src.layers.core.tf_op_layer",
    "class_name": "TFOpLambda",
    "registered_name": "TFOpLambda",
    "config": {"name": "tf.__operators__.add", "function": "__operators__.add"},
}


def test_a_tensor_op_layer_of_plain_maths_passes(tmp_path: Path) -> None:
    """``x + 1.0`` in a functional tf-keras model saves as this layer: it must keep loading."""
    functional = {"module": "tf_keras.src.engine.functional", "class_name": "Functional"}
    config = {**functional, "config": {"layers": [OP_ADD, DENSE]}}
    check_keras_config(_keras(tmp_path / "m.keras", config))


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        # A dotted class name resolves keras.layers.Lambda past a check on "Lambda" alone.
        ({"module": "keras", "class_name": "layers.Lambda", "config": {}}, "'layers.Lambda'"),
        (
            {"module": "keras.layers", "class_name": "Dense", "registered_name": "Lambda"},
            "holds a Lambda layer",
        ),
        (
            {"module": "keras.layers", "class_name": "Dense", "registered_name": "my>Dense"},
            "registers 'Dense' as 'my>Dense'",
        ),
        ({"module": "keras.layers", "class_name": ["Dense"]}, "names the class"),
        # Keras' own modules that are not model parts: the CVE-2025-9906 / -8747 functions.
        (
            {
                "module": "keras.src.saving.serialization_lib",
                "class_name": "function",
                "config": "enable_unsafe_deserialization",
            },
            "serialization_lib",
        ),
        ({"module": "keras.utils", "class_name": "function", "config": "get_file"}, "get_file"),
        ({"module": "keras.activations", "class_name": "function", "config": "a.b"}, "'a.b'"),
        # Op layers that would call a TensorFlow function the config names.
        ({**OP_ADD, "config": {"function": "io.write_file"}}, "'io.write_file'"),
        ({**OP_ADD, "config": {"function": "load_library"}}, "'load_library'"),
        ({**OP_ADD, "config": {"function": "print"}}, "'print'"),
        ({**OP_ADD, "config": {"function": "compat.v1.py_func"}}, "py_func"),
        ({**OP_ADD, "config": {"function": None}}, "None"),
        (
            {**OP_ADD, "class_name": "ClassMethod", "config": {"cls_symbol": "io.gfile.GFile"}},
            "ClassMethod",
        ),
    ],
)
def test_keras_names_that_reach_code_are_refused(
    tmp_path: Path, obj: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_keras_config(_keras(tmp_path / "m.keras", _model(DENSE, obj)))


def _zip_with(path: Path, *members: tuple[zipfile.ZipInfo | str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(_model(DENSE)))
        archive.writestr("metadata.json", "{}")
        for name, data in members:
            archive.writestr(name, data)
    return path


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK, as `zip --symlinks` writes it
    return info


@pytest.mark.parametrize(
    ("member", "says"),
    [
        (("../../escape.txt", b"x"), "a path out of the archive"),
        (("/etc/cron.d/x", b"x"), "a path out of the archive"),
        ((_symlink("assets/passwd"), b"/etc/passwd"), "a symbolic link"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_members_no_keras_file_has_are_refused(
    tmp_path: Path, member: tuple[Any, bytes], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        check_keras_config(_zip_with(tmp_path / "m.keras", member, ("assets/a", b"")))


def test_a_keras_zip_bomb_is_refused_before_keras_unpacks_it(tmp_path: Path) -> None:
    """More than three members: Keras would extract them all to disk, past any cap."""
    import os
    import subprocess
    import sys

    bomb = _zip_with(tmp_path / "bomb.keras", ("assets/zeros", bytes(4 << 20)), ("b", b""))
    assert bomb.stat().st_size < 64 << 10
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "optimize", str(bomb), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGEBENTO_MAX_DATA_BYTES": str(1 << 20)},
    )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: bomb.keras unpacks to") and "EDGEBENTO_MAX_DATA_BYTES" in line
