"""Data and ONNX inputs to ``edgebento optimize``, hostile and legitimate, through the real CLI.

A zip-bomb ``.npz`` with its peak RSS measured inside the process, absurd dims, and models with
external-data sidecars: one legitimate (optimized end to end), others whose sidecar leads out of
the model's directory (refused). Every failure is one ``error:`` line and leaves no pack.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelpack import Predictor, load_pack
from modelpack.errors import ConfigError
from optimize.convert import to_onnx
from tests.support.zipbomb import write_npz_bomb
from tests.unit.optimize import shapes

pytestmark = pytest.mark.slow

# Runs the CLI in this interpreter and writes its peak RSS (KiB) where RSS_OUT says. VmHWM is
# the high-water mark of this process image alone; ru_maxrss would count the parent's size at
# fork, which a pytest process that imported TensorFlow makes large.
MEASURED = (
    "import os, re, sys\n"
    "from edgebento.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read()\n"
    "with open(os.environ['RSS_OUT'], 'w') as out:\n"
    "    out.write(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
    "sys.exit(code)\n"
)


def _optimize(
    tmp_path: Path, source: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], int]:
    """``edgebento optimize SOURCE --out tmp/pack ...``; the result and its peak RSS in MiB."""
    rss = tmp_path / "rss"
    done = subprocess.run(
        [
            *(sys.executable, "-c", MEASURED, "optimize", str(source)),
            *("--out", str(tmp_path / "pack"), "--no-progress", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "EDGEBENTO_CACHE": str(tmp_path / "cache"),
            "RSS_OUT": str(rss),
            **(env or {}),
        },
    )
    return done, int(rss.read_text()) // 1024


def _refused(done: subprocess.CompletedProcess[str], tmp_path: Path) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "pack").exists()
    return lines[0]


def test_a_zip_bomb_npz_is_refused_with_memory_bounded(tmp_path: Path) -> None:
    """3 GiB of zeros in 3 MB: the model's input claims 2 GiB (past the cap), an array the model
    does not take claims 1 GiB. Neither is decompressed; the process stays small."""
    model = shapes.wide_mlp(tmp_path / "mlp.onnx")
    bomb = tmp_path / "bomb.npz"
    write_npz_bomb(bomb, {"x": 32, "unused": 16}, dtype="<f4")
    assert bomb.stat().st_size < 4 << 20

    done, rss_mib = _optimize(
        tmp_path, model, "--data", str(bomb), env={"EDGEBENTO_MAX_DATA_BYTES": str(256 << 20)}
    )
    line = _refused(done, tmp_path)
    assert line.startswith("error: bomb.npz: array 'x' would take 2.0 GiB (float32[536870912])")
    assert line.endswith("past the 256.0 MiB cap; set EDGEBENTO_MAX_DATA_BYTES to raise it")
    # numpy, onnx and onnxruntime loaded take ~150 MiB; one decompressed member would be 1 GiB.
    print(f"peak RSS {rss_mib} MiB")
    assert rss_mib < 400, rss_mib


def test_absurd_dims_are_one_error_line_not_a_memory_error(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40_000_000_000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 40_000_000_000])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "absurd", [x], [y])
    source = tmp_path / "absurd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)

    done, rss_mib = _optimize(tmp_path, source)
    line = _refused(done, tmp_path)
    assert line.startswith(
        "error: a synthetic input 'x' would take 9.3 TiB (float32[64, 40000000000]), past the"
    )
    print(f"peak RSS {rss_mib} MiB")
    assert rss_mib < 400, rss_mib


def _external(model_dir: Path) -> Path:
    """``wide_mlp`` saved with every initializer in one sidecar, ``weights.bin``."""
    model_dir.mkdir()
    source = shapes.wide_mlp(model_dir / "inline.onnx")
    model = onnx.load(str(source))
    path = model_dir / "mlp.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    source.unlink()
    return path


def test_a_model_with_external_data_is_optimized_end_to_end(tmp_path: Path) -> None:
    source = _external(tmp_path / "model")
    assert (tmp_path / "model" / "weights.bin").stat().st_size > 10_000
    done, _ = _optimize(tmp_path, source, "--prune", "off", "--quantize", "dynamic")
    assert done.returncode == 0, done.stderr

    pack = load_pack(tmp_path / "pack", trusted=[], allow_unsigned=True)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    import onnxruntime as ort

    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    (want,) = original.run(None, {"x": x})
    got = Predictor.from_pack(pack).run({"x": x})["logits"]
    if pack.manifest.optimization["chosen"] == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # int8: the same classes
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.8
    # The pack is one file: no sidecar travels with it.
    assert all(f.path != "weights.bin" for f in pack.manifest.files)


def _point_first_tensor_at(source: Path, location: str) -> None:
    model = onnx.load(str(source), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(source))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_a_sidecar_outside_the_models_directory_is_refused(tmp_path: Path, escape: str) -> None:
    source = _external(tmp_path / "model")
    secret = tmp_path / "secret.bin"
    secret.write_bytes((tmp_path / "model" / "weights.bin").read_bytes())  # would even fit
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[escape]
    if escape == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(secret)
    _point_first_tensor_at(source, location)

    if escape == "dotdot":  # once through the CLI, as a user meets it
        done, _ = _optimize(tmp_path, source)
        assert "leads out of the model's directory" in _refused(done, tmp_path)
    with pytest.raises(ConfigError, match=r"leads out of|not a relative path"):
        to_onnx(source, tmp_path / "copy.onnx", None)
    assert not (tmp_path / "copy.onnx").exists()


def test_a_sidecar_shorter_than_its_tensor_is_refused(tmp_path: Path) -> None:
    source = _external(tmp_path / "model")
    weights = tmp_path / "model" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"wants bytes \d+\.\.\d+ of weights.bin, which has 100"):
        to_onnx(source, tmp_path / "copy.onnx", None)


def test_a_file_that_is_not_onnx_is_one_error_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f")
    done, _ = _optimize(tmp_path, junk)
    assert "junk.onnx is not a readable ONNX model" in _refused(done, tmp_path)
