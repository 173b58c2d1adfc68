"""The time budget of ``edgebento optimize``, run as a user runs it: a default of 10 minutes,
``--time-budget 0`` for no limit, a small budget that stops the search with the best so far and
says what was not tried, and the progress line with the candidates left and the time left.

Behaviour only, never timings: a budget of a millisecond is spent before the first candidate
after FP32 on any machine, and a tiny model takes far less than the default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpack import Predictor, load_pack
from tests.unit.optimize import shapes

pytestmark = pytest.mark.integration
EDGEBENTO = str(Path(sys.executable).parent / "edgebento")
PRUNE_OFF = ("--prune", "off")


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    model = shapes.wide_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(5).standard_normal((96, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)  # no labels: judged against FP32's own answers
    return model, tmp_path / "data.npz"


def _optimize(
    model: Path, data: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = subprocess.run(
        [EDGEBENTO, "optimize", str(model), *("--out", out, "--data", data), *PRUNE_OFF, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", "EDGEBENTO_CACHE": str(out.parent / "cache")}
        | (env or {}),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((out / "report.json").read_text())


def _planned(report: dict) -> list[str]:
    """The candidates planned up front (refinement adds those with nodes kept in float)."""
    return [
        r["candidate"]
        for r in report["candidates"]
        if r["candidate"] != "fp32" and not r["config"].get("exclude")
    ]


def test_a_small_budget_keeps_the_best_so_far_and_says_what_was_not_tried(
    model_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = model_and_data
    _, full = _optimize(model, data, tmp_path / "full", "--time-budget", "0", "--no-progress")
    done, report = _optimize(
        model, data, tmp_path / "cut", "--time-budget", "0.001", "--no-progress"
    )
    planned = _planned(full)
    assert planned and not any(str(r["error"]).startswith("not tried") for r in full["candidates"])
    assert full["time_budget"]["seconds"] is None and full["time_budget"]["stopped"] is False
    # The same candidates were planned; past the budget none but FP32 ran, each listed as such.
    rows = {r["candidate"]: r for r in report["candidates"]}
    assert list(rows) == ["fp32", *planned]
    assert rows["fp32"]["fidelity"] and rows["fp32"]["latency"]
    for name in planned:
        assert rows[name]["error"] == "not tried: the time budget of 0.001 s ran out"
        assert rows[name]["fidelity"] is None
    budget = report["time_budget"]
    assert budget["stopped"] is True and budget["seconds"] == 0.001
    assert budget["not_tried"] == planned and budget["tried"] == 1
    assert report["chosen"] == "fp32"  # the best found before the budget ran out
    note = next(n for n in report["notes"] if n.startswith("the time budget of 0.001 s stopped"))
    assert f"1 of {len(planned) + 1} candidates tried; not tried: {', '.join(planned)}" in note
    assert "0 for no limit" in note
    console = " ".join(done.stdout.split())  # rich wraps long lines
    assert f"note: {note}" in console  # said on the console too
    assert f"✗ {planned[0]}: not tried: the time budget of 0.001 s ran out" in console
    # The pack holds the kept model and verifies as a device would.
    pack = load_pack(tmp_path / "cut", trusted=[], allow_unsigned=True)
    assert pack.manifest.optimization["chosen"] == "fp32"
    assert pack.samples is not None
    Predictor.from_pack(pack).run(pack.samples.inputs)


def test_the_default_budget_is_ten_minutes_and_progress_shows_the_time_left(
    model_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = model_and_data
    # A terminal as rich sees one: the progress bar draws each candidate's line.
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    done, report = _optimize(model, data, tmp_path / "pack", env=terminal)
    budget = report["time_budget"]
    assert budget["seconds"] == 600 and budget["stopped"] is False and budget["not_tried"] == []
    planned = len(_planned(report))
    assert budget["tried"] == len(report["candidates"])
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)
    lines = set(re.findall(r"candidate (\d+) of (\d+), (under 1 min|about \d+ min) left", plain))
    assert {int(k) for k, _, _ in lines} == set(range(1, planned + 1))
    assert {int(n) for _, n, _ in lines} == {planned}
    assert "stopped the search" not in done.stdout


def test_the_budget_must_be_a_number_of_seconds(
    model_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    model, _ = model_and_data
    for bad in ("-1", "nan"):
        done = subprocess.run(
            [EDGEBENTO, "optimize", str(model), "--out", str(tmp_path / "p"), "--time-budget", bad],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode != 0 and "time_budget" in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "p").exists()
