"""Keras files that carry code never run it by default: ``edgebento optimize`` as a user runs it.

Each hostile model holds a Lambda layer whose bytecode runs a shell command (``touch MARKER``)
when the model is built. The controls prove that it is armed: loaded with trust, it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from modelpack.errors import ConfigError

pytestmark = pytest.mark.slow

HDF5_REFUSED = (
    "is an HDF5 Keras file (the legacy format): loading it runs code stored in the file with your"
    " rights, so it is not loaded by default; save it as a zip .keras file"
    " (model.save('model.keras')), or pass --trust-model-code if you trust its author"
)


def _tf() -> Any:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from optimize.convert import import_tensorflow

    return import_tensorflow()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same model with a shell-running Lambda in each format, and the marker it would make."""
    tf = _tf()
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    # eval: the command is a constant of the lambda's own code object, so the bytecode that
    # Keras marshals into the file carries it.
    payload = eval(f"lambda t: (__import__('os').system('touch {marker}'), t)[1]")
    x = tf.keras.layers.Input((4,), name="x")
    model = tf.keras.Model(x, tf.keras.layers.Dense(2)(tf.keras.layers.Lambda(payload)(x)))
    model.save(str(root / "evil.h5"))
    shutil.copy(root / "evil.h5", root / "evil_hdf5.keras")  # HDF5 bytes under the safe name
    model.save(str(root / "evil_savedmodel"), save_format="tf")
    model.save(str(root / "evil_zip.keras"))  # the zip format, Lambda inside
    marker.unlink()  # building the model ran the payload once, here
    return {
        "marker": marker,
        "h5": root / "evil.h5",
        "renamed": root / "evil_hdf5.keras",
        "savedmodel": root / "evil_savedmodel",
        "zip": root / "evil_zip.keras",
    }


def _optimize(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(str(Path(sys.executable).parent / "edgebento"), "optimize", str(source)),
            *("--out", str(out), "--no-progress", "--prune", "off", "--quantize", "dynamic"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EDGEBENTO_CACHE": str(out.parent / "cache")},
    )


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("h5", f"evil.h5 {HDF5_REFUSED}"),
        ("renamed", f"evil_hdf5.keras {HDF5_REFUSED}"),
        (
            "savedmodel",
            "evil_savedmodel is a TensorFlow SavedModel directory: loading it runs code stored in"
            " the file with your rights, so it is not loaded by default; save it as a zip .keras"
            " file (model.save('model.keras')), or pass --trust-model-code if you trust its author",
        ),
        (
            "zip",
            "evil_zip.keras holds a Lambda layer, Python code that runs when the model is built,"
            " so it is not loaded by default; pass --trust-model-code if you trust its author",
        ),
    ],
)
def test_a_keras_file_with_code_is_refused_and_the_code_never_runs(
    hostile: dict[str, Path], kind: str, says: str, tmp_path: Path
) -> None:
    out = tmp_path / "pack"
    done = _optimize(hostile[kind], out)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {says}"]
    assert not hostile["marker"].exists()
    assert not out.exists()


def test_the_payload_is_armed_when_trusted(hostile: dict[str, Path], tmp_path: Path) -> None:
    """The control: with --trust-model-code the same HDF5 file runs its command."""
    out = tmp_path / "pack"
    done = _optimize(hostile["h5"], out, "--trust-model-code")
    assert hostile["marker"].exists(), done.stderr
    hostile["marker"].unlink()

    from optimize.convert import load_keras

    load_keras(hostile["savedmodel"], trust_model_code=True)
    assert hostile["marker"].exists()
    hostile["marker"].unlink()


def _rewrite_config(src: Path, dst: Path, change: Any) -> None:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            new.writestr(item, data)


def test_a_keras_config_naming_a_module_outside_keras_is_refused(tmp_path: Path) -> None:
    """tf-keras resolves ``module``/``class_name`` by importing any module; safe_mode does not
    stop it. A Dense layer whose activation is ``os.system`` is refused before Keras builds it."""
    tf = _tf()
    clean = tmp_path / "clean.keras"
    tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(2)]).save(str(clean))

    def poison(config: dict[str, Any]) -> None:
        dense = config["config"]["layers"][-1]["config"]
        dense["activation"] = {"module": "os", "class_name": "function", "config": "system"}

    hostile = tmp_path / "hostile.h5"  # a zip under an HDF5 name: the content decides
    _rewrite_config(clean, hostile, poison)
    from optimize.convert import load_keras

    with pytest.raises(ConfigError, match=r"^hostile.h5 refers to os.system, which is not part"):
        load_keras(hostile)
    assert load_keras(clean).layers[-1].units == 2  # Keras' own objects load as they are


def test_a_zip_keras_model_is_optimized_by_default(tmp_path: Path) -> None:
    tf = _tf()
    source = tmp_path / "mlp.keras"
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((6,), name="x"),
            tf.keras.layers.Dense(8, activation="relu"),
            tf.keras.layers.Dense(3),
        ]
    )
    model.save(str(source))
    done = _optimize(source, tmp_path / "pack")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pack" / "manifest.json").exists()
