"""What ``edgebento optimize`` prints, run as a user runs it: the notes that were only in
report.json (a skipped candidate, synthetic fidelity, an unsigned pack), how each candidate is
served (batched, or one request at a time when its rows mix), the CPU, and for a PyTorch file
the trust rule before anything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpack import load_pack
from tests.unit.optimize import shapes


def _edgebento(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "edgebento"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "EDGEBENTO_CACHE": str(cache)},
    )


def test_the_report_notes_are_printed_on_the_console(tmp_path: Path) -> None:
    model = shapes.several_inputs_scalar(tmp_path / "tagger.onnx")
    out = tmp_path / "pack"
    done = _edgebento(
        *("optimize", str(model), "--out", str(out), "--prune", "0.5", "--quantize", "dynamic"),
        "--no-progress",
        cache=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    notes = json.loads((out / "report.json").read_text())["notes"]
    printed = [line.removeprefix("note: ") for line in done.stdout.splitlines()]
    assert notes and all(note in printed for note in notes)
    assert "note: fidelity was measured on synthetic inputs: pass --data for real figures" in (
        done.stdout
    )
    assert "note: structured pruning at 50% not applied: ValueError: no prunable" in done.stdout
    assert "note: the pack is unsigned: devices and `edgebento bento import` refuse it" in (
        done.stdout
    )


def test_the_table_says_how_each_candidate_is_served_and_on_which_cpu(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = shapes.wide_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(3).standard_normal((96, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.savez(tmp_path / "data.npz", x=x, labels=logits.argmax(1))
    out = tmp_path / "pack"
    done = _edgebento(
        *("optimize", str(model), "--out", str(out), "--data", str(tmp_path / "data.npz")),
        *("--prune", "off", "--max-drop", "0.5", "--no-progress"),
        cache=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["candidate"]: r for r in report["candidates"]}
    lines = done.stdout.splitlines()

    def line_of(name: str) -> str:
        return next(line for line in lines if line.split("  ")[0].strip() == name)

    batch = rows["fp32"]["latency"]["batch"]
    assert f" ×{batch} " in line_of("fp32")
    assert f" ×{batch} " in line_of("static minmax per-channel")
    assert " alone " in line_of("dynamic per-channel")
    assert rows["dynamic per-channel"]["row_independent"] is False
    assert "alone = a row's answer changes with the rows beside it" in done.stdout
    machine = report["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["onnxruntime"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the flags the kernel reports, as recorded
        flags = set(cpuinfo.read_text().split("flags", 1)[-1].splitlines()[0].split())
        assert set(machine["flags"]) <= flags and ("avx2" in flags) == ("avx2" in machine["flags"])
    assert f"measured on: {machine['cpu']}" in done.stdout
    # The pack's manifest carries both beside the speedup, for whoever serves it.
    summary = load_pack(out, trusted=[], allow_unsigned=True).manifest.optimization
    assert summary["row_independent"] is rows[report["chosen"]]["row_independent"]
    assert summary["measured_on"].startswith(machine["cpu"])


def test_a_pytorch_file_hears_the_trust_rule_before_being_asked_for_data(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Scale(torch.nn.Module):  # type: ignore[misc]
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return features * 2

    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(Scale()), str(source))
    out = tmp_path / "pack"
    done = _edgebento("optimize", str(source), "--out", str(out), cache=tmp_path / "cache")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: model.pt is TorchScript, a program: loading it runs code")
    assert "--trust-model-code" in line and "--data" not in line
    trusted = _edgebento(
        "optimize", str(source), "--out", str(out), "--trust-model-code", cache=tmp_path / "cache"
    )
    assert trusted.returncode == 1
    assert trusted.stderr.strip().splitlines() == [
        "error: a PyTorch source needs --data: the export traces real inputs, an .npz with one"
        " array per parameter of forward, named as forward names them (docs/optimize.md)"
    ]
    assert not out.exists()
