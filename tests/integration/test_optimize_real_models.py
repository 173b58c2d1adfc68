"""Public ONNX models that PyPI packages ship, through ``edgebento optimize`` as a user runs it.

Silero VAD's LSTM state is ``[2, batch, 128]`` (rows on axis 1) beside a scalar ``sr``; it
crashed the search with ZeroDivisionError when every input was split on axis 0. PP-OCR's
direction classifier is a real MobileNetV3 CNN, where static QDQ lost top-1 agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_optimize_real import ocr_feeds, ppocr, silero_vad, vad_feeds
from modelpack import Predictor, load_pack

pytestmark = pytest.mark.integration


def _optimize(source: Path, tmp: Path, *extra: str) -> tuple[dict, str]:
    done = _run(source, tmp, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "pack" / "report.json").read_text()), done.stdout


def _run(source: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "edgebento"),
            "optimize",
            str(source),
            "--out",
            str(tmp / "pack"),
            "--data",
            str(tmp / "data.npz"),
            "--eval-data",
            str(tmp / "eval.npz"),
            "--prune",
            "off",
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", "EDGEBENTO_CACHE": str(tmp / "cache")},
    )


def _check_pack(tmp: Path, report: dict) -> None:
    pack = load_pack(tmp / "pack", trusted=[], allow_unsigned=True)
    assert pack.manifest.optimization["chosen"] == report["chosen"]
    samples = pack.samples
    assert samples is not None
    # Validated as a device would: PP-OCR names both free image sides "?", which is no symbol.
    got = Predictor.from_pack(pack).run(samples.inputs)
    for name, expected in samples.outputs.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5)
    chosen = next(c for c in report["candidates"] if c["chosen"])
    if report["chosen"] != "fp32":  # a quantized pick keeps the deciding metric in budget
        assert chosen["fidelity"]["decisive_value"] >= 0.99
    for row in report["candidates"]:  # every candidate has figures or says why not
        assert row["error"] or row["fidelity"]
        assert row["within_budget"] or row["error"] or row["violation"]


# Both v5 exports the wheel ships: the op15 one names its batch dim; silero_vad.onnx (the one
# with the If node on sr) names none (input [?, ?], state [2, ?, 128]), so only running a split
# tells rows from samples; it was refused with "Input initial_h must have shape {1,1,128}".
SILERO_EXPORTS = ("silero_vad_16k_op15.onnx", "silero_vad.onnx")


@pytest.mark.parametrize("export", SILERO_EXPORTS)
def test_silero_vad_state_on_axis_1_and_scalar_sr(tmp_path: Path, export: str) -> None:
    np.savez(tmp_path / "data.npz", **vad_feeds(48, 0))  # type: ignore[arg-type]
    np.savez(tmp_path / "eval.npz", **vad_feeds(32, 1))  # type: ignore[arg-type]
    source = silero_vad().with_name(export)
    report, stdout = _optimize(source, tmp_path, "--time-budget", "20")
    _check_pack(tmp_path, report)
    assert "decided by" in stdout
    fp32 = report["candidates"][0]
    # Rows were split along each input's own batch axis: the golden samples are 8 of the 32
    # eval rows, the state's on its axis 1, not 2 "rows" of state.
    samples = load_pack(tmp_path / "pack", trusted=[], allow_unsigned=True).samples
    assert samples is not None
    assert samples.inputs["input"].shape == (8, 512) and samples.inputs["state"].shape[1] == 8
    # The service batches only along axis 0, so it runs this model one request at a time, and
    # the search timed it so.
    assert fp32["row_independent"] is False and fp32["latency"]["batch"] == 1
    assert set(report["decided_by"]) == {"output cosine@min", "stateN cosine@min"}
    assert "rows could not be split" not in stdout
    # --data is no drift baseline here (rows are not on axis 0 everywhere): said, not crashed.
    assert "no drift baseline recorded" in stdout


def test_silero_vad_refused_only_for_a_feed_onnx_runtime_refuses(tmp_path: Path) -> None:
    feeds = vad_feeds(16, 0)
    # A state of the wrong width: ONNX Runtime refuses the feed as the user gave it.
    np.savez(tmp_path / "data.npz", **feeds | {"state": feeds["state"][..., :64]})  # type: ignore[arg-type]
    np.savez(tmp_path / "eval.npz", **feeds)  # type: ignore[arg-type]
    done = _run(silero_vad().with_name("silero_vad.onnx"), tmp_path)
    assert done.returncode != 0
    assert "the FP32 model refuses the data in data.npz as given" in done.stderr


def test_ppocr_direction_classifier_cnn(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", **ocr_feeds("cls", 48, 0))  # type: ignore[arg-type]
    np.savez(tmp_path / "eval.npz", **ocr_feeds("cls", 32, 1))  # type: ignore[arg-type]
    report, _ = _optimize(ppocr("cls"), tmp_path, "--time-budget", "30")
    _check_pack(tmp_path, report)
    names = {c["candidate"]: c for c in report["candidates"]}
    # The calibrators that crashed on real activations now give figures or a clean reason.
    for calibrator in ("entropy", "percentile"):
        row = names[f"static {calibrator} per-channel"]
        assert row["fidelity"] or row["error"]
    assert any(" top1@mean" in k for k in report["decided_by"])
