"""docs/optimize.md's worked PyTorch example, run as written in a folder of the user's own
(issue 23: the docs promised PyTorch and named only TorchScript; the example given since is
kept true by running it): its export script, the ``optimize`` line under it with
``--trust-model-code``, and the ONNX export that needs no flag, each giving a signed pack whose
inputs are named after ``forward``'s parameters."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from modelpack import load_pack

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _section() -> str:
    doc = (REPO / "docs" / "optimize.md").read_text()
    return doc.split("\n## PyTorch\n", 1)[1].split("\n## ", 1)[0]


def _run(args: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", EDGEBENTO_CACHE=str(folder / "c"))
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_pytorch_example_runs_as_written(tmp_path: Path) -> None:
    section = _section()
    export, onnx_export = re.findall(r"```python\n(.*?)```", section, re.S)
    block = re.search(r"^```\n(python export\.py\n.*?)^```", section, re.S | re.M)
    assert block is not None, "the example's shell block changed: keep this test running it"
    commands = block.group(1).strip().splitlines()
    assert commands[0] == "python export.py" and len(commands) == 2, commands
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "export.py").write_text(export)
    _run(["edgebento", "keygen", "--out", "."], folder)
    _run([sys.executable, "export.py"], folder)
    _run(shlex.split(commands[1]), folder)  # edgebento optimize model.pt ... --trust-model-code
    pack = load_pack(folder / "pack", trusted=[folder / "signing.pub"])
    assert [s.name for s in pack.manifest.inputs] == ["features", "temperature"]

    # The ONNX export beside it: the same model, no code loaded, no flag needed.
    (folder / "onnx_export.py").write_text(export + "\n" + onnx_export)
    _run([sys.executable, "onnx_export.py"], folder)
    _run(
        [
            *("edgebento", "optimize", "model.onnx", "--out", "pack-onnx", "--data", "calib.npz"),
            *("--quantize", "off", "--prune", "off"),  # the names are the point, not the search
        ],
        folder,
    )
    manifest = load_pack(folder / "pack-onnx", [], allow_unsigned=True).manifest  # no --key
    assert [s.name for s in manifest.inputs] == ["features", "temperature"]
    assert [s.name for s in manifest.outputs] == ["logits"]
