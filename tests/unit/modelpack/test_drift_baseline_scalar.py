"""A model with a scalar input (Silero VAD's ``sr``) gets one clear error for a baseline, not an
IndexError out of the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpack.baseline import make_baseline
from modelpack.errors import ConfigError
from modelpack.writer import create_pack


def _scaled(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "scaled", [x, s], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_scalar_input_is_one_config_error_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "p"
    create_pack(_scaled(tmp_path / "m.onnx"), root, name="scaled", version=1)
    data = {"x": np.ones((20, 4), np.float32), "s": np.asarray(2.0, np.float32)}
    with pytest.raises(ConfigError, match="input 's' is a scalar"):
        make_baseline(root, data)
