"""``edgebento optimize`` run as a user runs it: a subprocess, real files, a real model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpack import Predictor, load_pack
from modelpack.errors import SignatureError
from tests.unit.optimize import shapes


def _edgebento(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "edgebento"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture
def labelled(tmp_path: Path) -> tuple[Path, Path]:
    """A CNN and data labelled by its own predictions (so FP32 accuracy is 100%)."""
    import onnxruntime as ort

    model = shapes.cnn(tmp_path / "cnn.onnx")
    x = np.random.default_rng(0).standard_normal((160, 1, 8, 8)).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.savez(tmp_path / "data.npz", x=x, labels=logits.argmax(1))
    return model, tmp_path / "data.npz"


def test_optimize_signs_a_pack_that_verifies_and_reports(
    labelled: tuple[Path, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    model, data = labelled
    out = tmp_path / "pack"
    env = {"EDGEBENTO_CACHE": str(tmp_path / "cache"), "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = _edgebento(
        "optimize",
        str(model),
        "--out",
        str(out),
        "--name",
        "cnn",
        "--version",
        "3",
        "--data",
        str(data),
        "--max-drop",
        "0.02",
        "--key",
        str(keys[0]),
        "--bentoml",
        "--no-progress",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    # The table and where the report is are what the user reads.
    assert "candidates" in done.stdout and "fp32" in done.stdout
    assert "static minmax per-channel" in done.stdout
    assert f"report: {out / 'report.html'}" in done.stdout
    assert "saved to the BentoML model store as cnn:v3" in done.stdout

    pack = load_pack(out, trusted=[keys[1]])
    summary = pack.manifest.optimization
    assert summary["budget"] == "accuracy drop <= 2.00 points"
    assert {f.path for f in pack.manifest.files} >= {
        "model.onnx",
        "samples.npz",
        "report.json",
        "report.html",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == summary["chosen"]
    assert [s["name"] for s in report["footprint"]][:1] == ["normalize"]
    html = (out / "report.html").read_text()
    assert '<img alt="latency against fidelity" src="data:image/png;base64,' in html
    assert summary["chosen"] in html
    # The golden samples replay on the packed model.
    samples = pack.samples
    assert samples is not None
    got = Predictor.from_pack(pack).run(samples.inputs)
    np.testing.assert_allclose(got["logits"], samples.outputs["logits"], rtol=1e-4, atol=1e-4)

    # BentoML holds the same pack, the manifest as metadata.
    listed = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", "cnn:v3", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["metadata"]["manifest"]["name"] == "cnn"


def test_a_signed_pack_is_refused_with_another_key(
    labelled: tuple[Path, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from modelpack import generate_keypair

    model, data = labelled
    out = tmp_path / "pack"
    done = _edgebento(
        "optimize",
        str(model),
        "--out",
        str(out),
        "--data",
        str(data),
        "--quantize",
        "dynamic",
        "--prune",
        "off",
        "--key",
        str(keys[0]),
        "--no-progress",
        env={"EDGEBENTO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        load_pack(out, trusted=[other])


def test_bad_input_is_a_one_line_error(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = labelled
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((4, 1, 8, 8), np.float32))
    done = _edgebento("optimize", str(model), "--out", str(tmp_path / "p"), "--data", str(wrong))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: wrong.npz has no array 'x'; it holds image and the model takes x: name each"
        " array after the input it feeds, np.savez('wrong.npz', x=..., labels=...)"
    ]
    missing = _edgebento("optimize", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "p"))
    assert missing.returncode == 1 and "nope.onnx does not exist" in missing.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("cosin", "unknown metric 'cosin'"),
        ("logits=cosine@median", "reduction is one of min, mean, max"),
        ("no_such_module_xyz:score", "cannot import it"),
        ("nope=cosine", "the model has no output 'nope'; it has logits"),
        ("=>=", "expected [OUTPUT=]NAME"),
    ],
)
def test_a_bad_metric_is_a_one_line_error(
    labelled: tuple[Path, Path], tmp_path: Path, metric: str, message: str
) -> None:
    model, data = labelled
    done = _edgebento(
        "optimize",
        str(model),
        "--out",
        str(tmp_path / "p"),
        "--data",
        str(data),
        "--metric",
        metric,
        "--no-progress",
        env={"EDGEBENTO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_metric_flag_decides_and_the_table_says_so(
    labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = labelled
    done = _edgebento(
        "optimize",
        str(model),
        "--out",
        str(tmp_path / "p"),
        "--data",
        str(data),
        "--metric",
        "logits=max-abs<=0.5",
        "--quantize",
        "dynamic",
        "--prune",
        "off",
        "--no-progress",
        env={"EDGEBENTO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["decided_by"] == ["logits max-abs@max"]
    assert "decided by: logits max-abs@max" in done.stdout
