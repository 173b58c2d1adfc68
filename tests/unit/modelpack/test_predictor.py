from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpack import InputError, Predictor, PredictorOptions, load_pack
from modelpack.manifest import TensorSpec
from modelpack.metrics import InferenceMetrics
from modelpack.serving.limits import ServingLimits
from tests.support import models


@pytest.fixture
def predictor(signed_pack: Path, keys: tuple[Path, Path]) -> Predictor:
    return Predictor.from_pack(load_pack(signed_pack, trusted=[keys[1]]))


def test_golden_samples_reproduce(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    pack = load_pack(signed_pack, trusted=[keys[1]])
    samples = pack.samples
    assert samples is not None
    outputs = Predictor.from_pack(pack).run(samples.inputs)
    np.testing.assert_allclose(outputs["probs"], samples.outputs["probs"], rtol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "reason", "text"),
    [
        ({"y": [[0] * 8]}, "unknown_input", "unknown input 'y'; the model takes x"),
        ({}, "missing_input", "missing input 'x'"),
        ({"x": [0] * 8}, "shape", r"expected rank 2 \[batch, 8\], got shape \[8\]"),
        ({"x": [[0] * 7]}, "shape", r"dim 1 must be 8 \[batch, 8\], got 7"),
        ({"x": [[0] * 8] * 17}, "batch_too_large", "batch of 17 rows is over the cap of 16"),
        ({"x": [[True] * 8]}, None, None),
    ],
)
def test_input_validation(
    predictor: Predictor, inputs: dict, reason: str | None, text: str | None
) -> None:
    if reason is None:
        assert predictor.run(inputs)["probs"].shape == (1, 3)  # bools coerce to float32 safely
        return
    with pytest.raises(InputError, match=text) as exc:
        predictor.validate(inputs, ServingLimits(max_rows=16))
    assert exc.value.reason == reason


def test_integer_inputs_coerce_only_without_loss(tmp_path: Path) -> None:
    path = models.two_inputs(tmp_path / "two.onnx")
    specs = [
        TensorSpec(name="a", dtype="float32", shape=["batch", 4]),
        TensorSpec(name="k", dtype="int64", shape=["batch", 1]),
    ]
    p = Predictor(path, specs, [TensorSpec(name="y", dtype="float32", shape=["batch", 4])])
    out = p.run({"a": np.ones((2, 4)), "k": np.array([[2.0], [3.0]])})
    np.testing.assert_array_equal(out["y"], [[2] * 4, [3] * 4])
    with pytest.raises(InputError, match="expected integers"):
        p.run({"a": np.ones((1, 4)), "k": [[2.5]]})
    with pytest.raises(InputError, match=r"dim 0 \(batch\) is 1 but 2 in another input"):
        p.run({"a": np.ones((2, 4)), "k": [[1]]})


def test_string_tensors_are_refused_with_a_reason(tmp_path: Path) -> None:
    from modelpack.errors import ModelInvalidError

    path = models.two_inputs(tmp_path / "two.onnx")
    specs = [TensorSpec(name="a", dtype="string", shape=["batch", 4])]
    with pytest.raises(ModelInvalidError, match="string tensor"):
        Predictor(path, specs, [])


def test_byte_cap(predictor: Predictor) -> None:
    with pytest.raises(InputError, match="the cap is 64") as exc:
        predictor.validate({"x": np.zeros((4, 8), np.float32)}, ServingLimits(max_input_bytes=64))
    assert exc.value.reason == "too_large"


def test_session_threads_and_spinning(predictor: Predictor) -> None:
    from modelpack.predictor import session_options

    so = session_options(PredictorOptions(intra_op_threads=1))
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert predictor.warmup_error is None


def test_metrics_names() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry=registry)
    metrics.set_model("tiny", 1)
    metrics.set_model("tiny", 2)
    metrics.ok(0.002)
    metrics.rejected_input("shape")
    text = generate_latest(registry).decode()
    assert 'edgebento_model_info{name="tiny",version="2"} 1.0' in text
    assert 'version="1"' not in text
    assert 'edgebento_requests_total{outcome="ok"} 1.0' in text
    assert 'edgebento_input_rejected_total{reason="shape"} 1.0' in text
    assert "edgebento_inference_seconds_bucket" in text
