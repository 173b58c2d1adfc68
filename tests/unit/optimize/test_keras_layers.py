"""The layer allow-list of a zip ``.keras`` file, and its weights read as data (no TF needed).

The config must name only layers of tensor maths, each with only the keys Keras writes for it;
the weights file must read only its own bytes. Hypothesis builds models out of the allowed
layers (they pass) and then breaks one thing (they are refused, naming what was wrong).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.errors import ConfigError
from optimize import keras_layers
from optimize.keras_config import check_keras_config
from tests.unit.optimize.test_build_inputs_keras_config import JSON

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PLAIN = st.none() | st.booleans() | st.integers(-5, 5) | st.lists(st.integers(0, 9), max_size=3)
# Keys whose values Keras looks up by name: a random plain value is no realistic model there.
NAMED = ("activation", "dtype", "_initializer", "_regularizer", "_constraint", "function", "layers")


def _weights(**datasets: Any) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        group = h5.create_group("layers/dense/vars")
        group["0"] = np.ones((2, 2), np.float32)
        for name, make in datasets.items():
            make(group, name)
    return buffer.getvalue()


def _keras(path: Path, config: Any, weights: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("model.weights.h5", weights if weights is not None else _weights())
    return path


def _model(*layers: Any) -> dict[str, Any]:
    return {"module": "keras", "class_name": "Sequential", "config": {"layers": list(layers)}}


def _plain_key(key: str) -> bool:
    return not any(key.endswith(n) for n in NAMED)


@st.composite
def layers(draw: st.DrawFn) -> dict[str, Any]:
    """An allowed layer with a random subset of its own keys, holding plain values."""
    kind = draw(
        st.sampled_from(sorted(set(keras_layers.LAYERS) - {"TFOpLambda", "SlicingOpLambda"}))
    )
    keys = sorted(k for k in keras_layers.LAYERS[kind] if _plain_key(k))
    chosen = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    config = {k: draw(PLAIN) for k in chosen}
    if "activation" in keras_layers.LAYERS[kind] and draw(st.booleans()):
        config["activation"] = draw(st.sampled_from(sorted(keras_layers.ACTIVATIONS)))
    if "kernel_initializer" in keras_layers.LAYERS[kind] and draw(st.booleans()):
        config["kernel_initializer"] = {
            "module": "keras.initializers",
            "class_name": "GlorotUniform",
            "config": {"seed": None},
            "registered_name": None,
        }
    config["dtype"] = {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
    }
    return {"module": "keras.layers", "class_name": kind, "config": config, "registered_name": None}


MODELS = st.lists(layers(), min_size=1, max_size=5)


@given(stack=MODELS)
@SETTINGS
def test_a_model_of_allowed_layers_with_their_own_keys_passes(
    tmp_path: Path, stack: list[Any]
) -> None:
    assert check_keras_config(_keras(tmp_path / "m.keras", _model(*stack))).major == 3


@given(stack=MODELS, which=st.integers(0, 4), key=st.text(min_size=1, max_size=12))
@SETTINGS
def test_a_key_keras_does_not_write_is_refused_and_named(
    tmp_path: Path, stack: list[Any], which: int, key: str
) -> None:
    layer = stack[which % len(stack)]
    if key in keras_layers.LAYERS[layer["class_name"]]:
        return
    layer["config"][key] = 1
    with pytest.raises(ConfigError, match="the config key") as refused:
        check_keras_config(_keras(tmp_path / "m.keras", _model(*stack)))
    assert f"the config key {key!r}" in str(refused.value)
    assert "--trust-model-code" in str(refused.value)


@given(
    stack=MODELS,
    which=st.integers(0, 4),
    kind=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
)
@SETTINGS
def test_a_class_outside_the_list_is_refused_and_named(
    tmp_path: Path, stack: list[Any], which: int, kind: str
) -> None:
    if kind in keras_layers.LAYERS or kind in keras_layers.MODELS:
        return
    stack[which % len(stack)]["class_name"] = kind
    with pytest.raises(ConfigError, match=kind):
        check_keras_config(_keras(tmp_path / "m.keras", _model(*stack)))


def _tf_op_layer(node_def: dict[str, Any]) -> dict[str, Any]:
    """What tf-keras writes for a raw TensorFlow op in a functional model."""
    return {
        "module": "tf_keras.src.engine.base_layer",
        "class_name": "TensorFlowOpLayer",
        "config": {"name": "debug", "trainable": True, "dtype": "float32", "node_def": node_def},
        "registered_name": "TensorFlowOpLayer",
        "name": "debug",
        "inbound_nodes": [[["dense", 0, 0, {}]]],
    }


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        (
            _tf_op_layer({"op": "DebugIdentity", "attr": {"debug_urls": ["file:///tmp/x"]}}),
            "holds a TensorFlowOpLayer layer at layers[1]",
        ),
        ({"module": "my_layers", "class_name": "Custom", "config": {}}, "my_layers.Custom"),
        ({"module": "keras.layers", "class_name": "TextVectorization"}, "TextVectorization"),
        (
            {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2, "x": 1}},
            "gives its Dense the config key 'x' at layers[1], which Keras' own Dense",
        ),
        (
            {"class_name": "Dense", "config": {"activation": "deserialize"}},
            "names 'deserialize' as activation",
        ),
        (
            {"class_name": "Dense", "config": {"kernel_initializer": "get"}},
            "names 'get' as kernel_initializer",
        ),
        (
            {"class_name": "Dense", "config": {"kernel_initializer": {"class_name": "Dense"}}},
            "holds a Dense object",
        ),
        ({"class_name": "Dense", "config": {"dtype": "os.system"}}, "as a dtype"),
        ({"class_name": "Dense", "unknown": 1}, "the unknown entry 'unknown'"),
        ({**_model(), "compile_config": {"optimizer": {"class_name": "Adam"}}}, "Adam"),
    ],
    ids=[
        "tf-op-layer", "custom", "preprocessing", "unknown-key", "activation-name",
        "initializer-name", "wrong-role", "dtype", "outer-key", "nested-compile",
    ],
)  # fmt: skip
def test_what_is_not_tensor_maths_is_refused_with_the_flag(
    tmp_path: Path, obj: dict[str, Any], says: str
) -> None:
    dense = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}
    with pytest.raises(ConfigError, match="--trust-model-code") as refused:
        check_keras_config(_keras(tmp_path / "m.keras", _model(dense, obj)))
    assert says in str(refused.value)


def test_the_top_compile_config_is_not_built_so_not_checked(tmp_path: Path) -> None:
    """Both loaders drop it with compile=False: a compiled model's optimizer is no reason."""
    model = {**_model(), "compile_config": {"optimizer": {"class_name": "Adam"}}}
    check_keras_config(_keras(tmp_path / "m.keras", model))


def _external(group: h5py.Group, name: str, target: Path) -> None:
    group.create_dataset(name, shape=(4,), dtype="f4", external=[(str(target), 0, 16)])


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda g, n, secret: _external(g, n, secret),
            "stores the dataset '/layers/dense/vars/1' in an external file",
        ),
        (
            lambda g, n, secret: g.__setitem__(n, h5py.ExternalLink(str(secret), "/")),
            "has an external link '/layers/dense/vars/1'",
        ),
        (
            lambda g, n, secret: g.__setitem__(n, h5py.SoftLink("/layers")),
            "has a soft link",
        ),
        (
            lambda g, n, secret: _virtual(g, n, secret),
            "has a virtual dataset '/layers/dense/vars/1'",
        ),
        (
            lambda g, n, secret: _filtered(g, n, 307),
            "needs the HDF5 filter 307",
        ),
    ],
    ids=["external-storage", "external-link", "soft-link", "virtual", "plugin-filter"],
)
def test_weights_that_read_outside_the_file_are_refused(
    tmp_path: Path, make: Any, says: str
) -> None:
    secret = tmp_path / "credentials"
    secret.write_bytes(b"aws_secret_access_key = AKIAFAKEFAKEFAKE")
    weights = _weights(**{"1": lambda g, n: make(g, n, secret)})
    dense = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}
    with pytest.raises(ConfigError) as refused:
        check_keras_config(_keras(tmp_path / "m.keras", _model(dense), weights))
    assert str(refused.value).startswith(f"m.keras: model.weights.h5 {says}")
    assert "--trust-model-code" in str(refused.value)
    assert "AKIA" not in str(refused.value)


def _virtual(group: h5py.Group, name: str, source: Path) -> None:
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(source), "data", shape=(4,))
    group.create_virtual_dataset(name, layout)


def _filtered(group: h5py.Group, name: str, code: int) -> None:
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_chunk((4,))
    plist.set_filter(code, h5py.h5z.FLAG_OPTIONAL)
    space = h5py.h5s.create_simple((4,))
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.IEEE_F32LE, space, dcpl=plist)


def test_compressed_weights_and_cycles_read_as_data(tmp_path: Path) -> None:
    """HDF5's own filters need no plugin; a group linked into itself is walked once."""

    def compressed(group: h5py.Group, name: str) -> None:
        group.create_dataset(name, data=np.ones(64), compression="gzip", shuffle=True)
        group["loop"] = group.file["layers"]

    weights = _weights(**{"1": compressed})
    dense = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}
    check_keras_config(_keras(tmp_path / "m.keras", _model(dense), weights))


def test_npz_weights_are_read_as_numeric_arrays(tmp_path: Path) -> None:
    """Keras can store the weights as .npz: the same header checks as --data apply."""
    objects = io.BytesIO()
    np.savez(objects, a=np.array([{"x": 1}], dtype=object))
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(_model()))
        archive.writestr("model.weights.npz", objects.getvalue())
    with pytest.raises(ConfigError, match=r"m.keras: model.weights.npz: array 'a' holds Python"):
        check_keras_config(path)


def test_a_data_npz_member_stored_as_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """zipfile would read the link's text, but an unzip follows it to any file of the machine."""
    from optimize.npz import open_npz

    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        link = zipfile.ZipInfo("x.npy")
        link.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK, as `zip --symlinks` writes it
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ConfigError, match=r"^data.npz holds 'x.npy', a symbolic link$"):
        open_npz(path)


@given(config=JSON)
@SETTINGS
def test_whatever_passes_names_only_allowed_classes(tmp_path: Path, config: Any) -> None:
    """Random configs built from the keys and names the check cares about: one ConfigError or
    a pass, and a pass means every object in it is on the list."""
    try:
        check_keras_config(_keras(tmp_path / "m.keras", config))
    except ConfigError:
        return
    if isinstance(config, dict):  # the optimizer state (compile_config) is never built
        config = {k: v for k, v in config.items() if k != "compile_config"}
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if {"class_name", "module", "registered_name"} & set(node):
                assert node.get("class_name") in {*keras_layers.ALL_CLASSES, "function"}
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
