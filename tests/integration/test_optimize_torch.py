"""``edgebento optimize`` on a TorchScript file, run as a user runs it: a subprocess, real files.

TorchScript is a program, so it loads only with ``--trust-model-code``; without it the file is
refused before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # the test extra installs it: edgebento[torch]

from modelpack import Predictor, load_pack

pytestmark = pytest.mark.slow


def _edgebento(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "edgebento"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **env},
    )


def _assert_refused(source: Path, data: Path, message: str) -> None:
    """``edgebento optimize`` without trust fails with ``message`` as its one line, no pack."""
    out = source.parent / "pack"
    done = _edgebento(
        *("optimize", str(source), "--out", str(out), "--data", str(data), "--no-progress"),
        env={"EDGEBENTO_CACHE": str(out.parent / "cache")},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


class Classifier(torch.nn.Module):
    """A small MLP classifier over two inputs: 12 features and a per-row temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(12, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
        )

    def forward(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return self.body(features) / temperature


@pytest.fixture
def scripted(tmp_path: Path) -> tuple[Any, Path, Path]:
    torch.manual_seed(0)
    net = Classifier().eval()
    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(net), str(source))
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(
        data,
        features=rng.standard_normal((128, 12)).astype(np.float32),
        temperature=rng.uniform(0.5, 2.0, (128, 1)).astype(np.float32),
    )
    return net, source, data


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_torchscript_becomes_a_signed_pack_matching_torch(
    scripted: tuple[Any, Path, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    net, source, data = scripted
    out = tmp_path / "pack"
    done = _edgebento(
        "optimize",
        str(source),
        "--out",
        str(out),
        "--name",
        "n",
        "--version",
        "1",
        "--data",
        str(data),
        "--prune",
        "off",
        "--quantize",
        "dynamic",
        "--key",
        str(keys[0]),
        "--no-progress",
        "--trust-model-code",  # TorchScript is a program: this test wrote it
        env={"EDGEBENTO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    assert "candidates" in done.stdout and "fp32" in done.stdout
    assert f"report: {out / 'report.html'}" in done.stdout
    # torch.onnx's deprecation notices are not the user's business.
    assert "TorchScript-based ONNX export" not in done.stderr

    pack = load_pack(out, trusted=[keys[1]])  # the signature verifies
    assert (pack.manifest.name, pack.manifest.version) == ("n", 1)
    assert [i.name for i in pack.manifest.inputs] == ["features", "temperature"]
    assert [o.name for o in pack.manifest.outputs] == ["output"]
    samples = pack.samples
    assert samples is not None and samples.inputs["features"].shape[0] > 0
    # The packed model replays its golden samples, and they agree with the torch model itself
    # within the default budget (the chosen model may be int8).
    got = Predictor.from_pack(pack).run(samples.inputs)["output"]
    np.testing.assert_allclose(got, samples.outputs["output"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = net(*(torch.from_numpy(samples.inputs[n]) for n in ("features", "temperature")))
    want = want.numpy()
    assert _cosine_rows(got, want).min() >= 0.99
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    if pack.manifest.optimization["chosen"] == "fp32":  # an FP32 pack is the torch model exactly
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pickled_module_is_refused_in_one_line_and_never_run(
    scripted: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    _, _, data = scripted
    marker = tmp_path / "pwned"

    class Trojan(torch.nn.Module):
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    source = tmp_path / "trojan.pt"
    torch.save(Trojan(), str(source))
    _assert_refused(
        source,
        data,
        "trojan.pt is a pickled torch.save file, not TorchScript; unpickling can run any"
        " code, so it is not loaded: save it with torch.jit.save(torch.jit.script(model))",
    )
    assert not marker.exists()


def test_torchscript_is_refused_without_trust_before_it_can_touch_a_file(
    scripted: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    _, _, data = scripted
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"the user's own file")

    class Writer(torch.nn.Module):
        def __init__(self, path: str, size: int) -> None:
            super().__init__()
            self.path, self.size = path, size

        def forward(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
            mapped = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
            mapped.zero_()
            return features / temperature + mapped.sum().to(features.dtype)

    source = tmp_path / "writer.pt"
    torch.jit.save(torch.jit.script(Writer(str(victim), victim.stat().st_size)), str(source))
    _assert_refused(
        source,
        data,
        "writer.pt is TorchScript, a program: loading it runs code stored in the file"
        " with your rights, so it is not loaded by default; export ONNX with torch.onnx.export,"
        " or pass --trust-model-code if you trust its author",
    )
    assert victim.read_bytes() == b"the user's own file"
