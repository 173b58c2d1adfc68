"""Hostile zip ``.keras`` files whose config passes as plain Dense layers, through the real CLI.

Issue 19, findings 1 and 2: a weight array stored in HDF5 *external storage* at an absolute
path copied a file of the build machine (an AWS key here) into the signed pack; a
``TensorFlowOpLayer`` carried a raw ``DebugIdentity`` op with ``debug_urls``. Both are refused
before Keras opens anything, with one ``error:`` line, and nothing of the secret is written.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.integration.test_build_inputs_keras import _optimize as optimize_cli

pytestmark = pytest.mark.slow

# A fake key in the shape of AWS's documented example; 32 bytes are a Dense(8) bias.
SECRET = b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _optimize(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, FP32 only: the pack's bytes are the converted model's."""
    return optimize_cli(source, out, "--quantize", "off", *extra)


def _one_error_line(done: subprocess.CompletedProcess[str], out: Path) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not out.exists()
    return lines[0]


def _save(flavour: str, path: Path) -> None:
    """A plain Dense model saved by tf-keras or by Keras 3 itself."""
    from optimize.convert import import_tensorflow

    tf = import_tensorflow()
    if flavour == "keras3":
        import keras
    else:
        keras = tf.keras
    model = keras.Sequential(
        [
            keras.layers.Input((6,), name="x"),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    model.save(str(path))


def _external_bias(source: Path, dst: Path, secret: Path) -> str:
    """The hidden layer's bias moved to external storage at ``secret``'s absolute path; its
    dataset's name (Keras names the groups after the class: ``layers/dense/vars/1``)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(dst, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as h5:
                    biases = [
                        name
                        for name, obj in _datasets(h5)
                        if obj.shape == (8,)  # the only (8,) array: Dense(8)'s bias
                    ]
                    (bias,) = biases
                    del h5[bias]
                    h5.create_dataset(
                        bias, shape=(8,), dtype="<f4", external=[(str(secret.resolve()), 0, 32)]
                    )
                data = buffer.getvalue()
            new.writestr(item, data)
    return f"/{bias}"


def _datasets(h5: h5py.File) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    h5.visititems(
        lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
    )
    return found


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("home") / "credentials"
    path.write_bytes(SECRET)
    return path


@pytest.mark.parametrize("flavour", ["tf_keras", "keras3"])
def test_a_weight_in_external_storage_is_refused_and_the_secret_written_nowhere(
    tmp_path: Path, secret: Path, flavour: str
) -> None:
    clean, hostile = tmp_path / "clean.keras", tmp_path / "model.keras"
    _save(flavour, clean)
    bias = _external_bias(clean, hostile, secret)
    out = tmp_path / "pack"
    done = _optimize(hostile, out)
    assert _one_error_line(done, out) == (
        f"error: model.keras: model.weights.h5 stores the dataset {bias!r}"
        f" in an external file ('{secret.resolve()}'): reading the weights would read another"
        " file, and Keras never writes one, so it is not loaded by default; save the model"
        " again with model.save('model.keras'), or pass --trust-model-code if you trust its"
        " author"
    )
    assert SECRET[:32] not in (done.stdout + done.stderr).encode()
    assert _files_holding(tmp_path, SECRET[:32]) == []  # cache, pack, temp copies: none


def test_the_external_storage_payload_is_armed_when_trusted(tmp_path: Path, secret: Path) -> None:
    """The control: with --trust-model-code (no checks) the bias bytes are the secret's, in the
    pack's model.onnx, which is what every default run did before."""
    clean, hostile = tmp_path / "clean.keras", tmp_path / "model.keras"
    _save("tf_keras", clean)
    _external_bias(clean, hostile, secret)
    out = tmp_path / "pack"
    done = _optimize(hostile, out, "--trust-model-code")
    assert done.returncode == 0, done.stderr
    assert out / "model.onnx" in _files_holding(out, SECRET[:32])


def _tf_op_layer_model(path: Path, debug_dir: Path) -> None:
    """A functional tf-keras model with a TensorFlowOpLayer running DebugIdentity with
    ``debug_urls`` pointing at ``debug_dir``, as tf-keras itself saves one."""
    from optimize.convert import import_tensorflow

    tf = import_tensorflow()
    from tf_keras.src.engine.base_layer import TensorFlowOpLayer

    node = tf.compat.v1.NodeDef(name="debug", op="DebugIdentity")
    node.input.append("hidden/BiasAdd")
    node.attr["T"].type = tf.float32.as_datatype_enum
    node.attr["debug_urls"].list.s.append(f"file://{debug_dir}".encode())
    x = tf.keras.Input((6,), name="x")
    hidden = tf.keras.layers.Dense(8, name="hidden")(x)
    debug = TensorFlowOpLayer(node.SerializeToString(), name="debug")(hidden)
    tf.keras.Model(x, tf.keras.layers.Dense(3, name="out")(debug)).save(str(path))


def test_a_tensorflow_op_layer_is_refused_before_anything_runs(tmp_path: Path) -> None:
    debug_dir = tmp_path / "written-by-the-model"
    debug_dir.mkdir()
    source = tmp_path / "model.keras"
    _tf_op_layer_model(source, debug_dir)
    config = json.loads(zipfile.ZipFile(source).read("config.json"))
    (op_layer,) = [
        layer for layer in config["config"]["layers"] if layer["class_name"] == "TensorFlowOpLayer"
    ]
    assert op_layer["config"]["node_def"]["op"] == "DebugIdentity"
    out = tmp_path / "pack"
    line = _one_error_line(_optimize(source, out), out)
    assert line.startswith("error: model.keras holds a TensorFlowOpLayer layer at layers[2];")
    assert line.endswith("pass --trust-model-code if you trust its author")
    assert list(debug_dir.iterdir()) == []
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.onnx"))


def test_the_same_models_without_the_payload_are_optimized(tmp_path: Path) -> None:
    """What the checks let through: plain Dense models by both Keras versions, end to end."""
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).random((32, 6), np.float32))
    for flavour in ("tf_keras", "keras3"):
        source = tmp_path / f"{flavour}.keras"
        _save(flavour, source)
        done = _optimize(source, tmp_path / flavour, "--data", str(tmp_path / "data.npz"))
        assert done.returncode == 0, done.stderr
        assert (tmp_path / flavour / "model.onnx").exists()
