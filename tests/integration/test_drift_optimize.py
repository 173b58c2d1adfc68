"""``edgebento optimize --data`` records the drift baseline in the pack it signs; a bad
``--monitor`` is refused before any optimization runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from modelpack import load_pack
from modelpack.baseline import read_baseline
from tests.unit.optimize import shapes


def _edgebento(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "edgebento"), *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200", "EDGEBENTO_CACHE": str(cwd / "cache")},
    )  # fmt: skip


def test_optimize_with_data_signs_a_baseline_of_images_and_classes(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    model = shapes.cnn(tmp_path / "cnn.onnx")
    x = np.random.default_rng(0).standard_normal((200, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    out = tmp_path / "pack"
    done = _edgebento(
        "optimize", str(model), "--out", str(out), "--data", str(tmp_path / "data.npz"),
        "--quantize", "off", "--key", str(keys[0]), "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "baseline: " in done.stdout and "monitored features on 200 rows" in done.stdout
    baseline = read_baseline(load_pack(out, trusted=[keys[1]]).root)  # signed with it
    assert baseline is not None and baseline.rows == 200
    names = [f.name for f in baseline.features]
    assert names[:3] == ["x.c0.mean", "x.c0.std", "x.brightness"]
    assert any(f.kind == "categorical" or f.name.endswith("]") for f in baseline.features[3:])


def test_a_bad_monitor_spec_is_refused_before_optimizing(tmp_path: Path) -> None:
    model = shapes.cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "data.npz", x=np.zeros((20, 1, 8, 8), np.float32))
    start = time.monotonic()
    done = _edgebento(
        "optimize", str(model), "--out", str(tmp_path / "pack"), "--data",
        str(tmp_path / "data.npz"), "--monitor", "x=pixels", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--monitor 'x=pixels'" in done.stderr and "image" in done.stderr
    assert not (tmp_path / "pack").exists()
    assert time.monotonic() - start < 60
