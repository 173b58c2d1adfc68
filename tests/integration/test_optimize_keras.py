"""A Keras source: converted with tf2onnx, pruned with tfmot and by units, each fine-tuned."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from modelpack import load_pack
from optimize import optimize_model

pytestmark = pytest.mark.slow


def _keras_model(tmp_path: Path) -> tuple[Path, Path]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from optimize.convert import import_tensorflow

    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((12,), name="x"),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(4),
        ]
    )
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(str(path))
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    return path, tmp_path / "train.npz"


def _kernels(path: Path) -> list[np.ndarray]:
    return [
        a
        for a in (numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer)
        if a.ndim == 2
    ]


def test_keras_model_is_converted_and_pruned(tmp_path: Path) -> None:
    source, train = _keras_model(tmp_path)
    result = optimize_model(
        source,
        tmp_path / "pack",
        name="keras-mlp",
        version=1,
        data=train,
        train_data=train,
        quantize="dynamic",
        prune=0.5,
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.5,
    )
    by_name = {c.name: c for c in result.candidates}
    assert {"fp32", "keras-sparse-80%", "keras-prune-50%"} <= set(by_name)
    sparse, units = by_name["keras-sparse-80%"], by_name["keras-prune-50%"]
    assert sparse.path is not None and units.path is not None
    # tfmot left 80% zeros in the dense kernels: gzip sees them, the report says so.
    zeros = np.mean(np.concatenate([k.ravel() for k in _kernels(sparse.path)]) == 0)
    assert zeros >= 0.7
    assert sparse.size is not None and by_name["fp32"].size is not None
    assert sparse.size.gzip_bytes < 0.6 * by_name["fp32"].size.gzip_bytes
    # Unit pruning removed half the hidden units from both kernels.
    assert sorted(k.shape for k in _kernels(units.path)) == [(12, 32), (32, 4)]
    report = result.report_json.read_text()
    assert "ONNX Runtime skips no zeros" in report
    pack = load_pack(result.pack_dir, trusted=[], allow_unsigned=True)
    assert pack.manifest.inputs[0].name == "x"


def test_tensorflow_start_up_lines_are_held_back_and_shown_when_the_import_fails() -> None:
    import subprocess
    import sys

    quiet = "from optimize.convert import import_tensorflow; import_tensorflow(); print('ready')"
    done = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ready", done.stderr
    assert "oneDNN" not in done.stderr and "absl" not in done.stderr

    # A broken TensorFlow: what its import printed on fd 2 reaches the user with the traceback.
    broken = (
        "import os, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow':\n"
        "            os.write(2, b'native: libtensorflow_framework.so.2 is missing\\n')\n"
        "            raise ImportError('no tensorflow')\n"
        "sys.meta_path.insert(0, Finder())\n"
        "from optimize.convert import import_tensorflow\n"
        "import_tensorflow()\n"
    )
    done = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True)
    assert done.returncode == 1
    assert "libtensorflow_framework.so.2 is missing" in done.stderr
    assert "ImportError: no tensorflow" in done.stderr
