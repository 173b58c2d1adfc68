from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.optimize import shapes


@pytest.fixture(scope="session")
def shape_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="session")
def wide_mlp(shape_dir: Path) -> Path:
    return shapes.wide_mlp(shape_dir / "wide_mlp.onnx")


@pytest.fixture(scope="session")
def cnn(shape_dir: Path) -> Path:
    return shapes.cnn(shape_dir / "cnn.onnx")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def mlp_data(shape_dir: Path) -> Path:
    """Inputs for ``wide_mlp`` with labels that the model's own argmax gives (accuracy 100%)."""
    import onnxruntime as ort

    model = shapes.wide_mlp(shape_dir / "labelled.onnx")
    x = np.random.default_rng(7).standard_normal((96, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    path = shape_dir / "mlp_data.npz"
    np.savez(path, x=x, labels=logits.argmax(1))
    return path
