"""PP-OCR's direction classifier calibrated and judged on real images, as a user would.

The rows are scikit-image's scanned page cut into text lines (half of them upside down), the
held-back rows other lines of it and of a scene-text photo (``benchmarks.real_images``). The
pick must keep the fidelity budget and never be slower than FP32 by the search's own figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_optimize_images import source
from benchmarks.real_images import FEEDS
from modelpack import Predictor, load_pack
from optimize import optimize_model

pytestmark = pytest.mark.integration


def test_ppocr_cls_on_real_text_lines_keeps_the_budget_and_fp32_speed(tmp_path: Path) -> None:
    calibration, held_back = FEEDS["ppocr_cls"](32, "calibration"), FEEDS["ppocr_cls"](32, "eval")
    assert not any(np.array_equal(e, c) for e in held_back["x"] for c in calibration["x"])
    np.savez(tmp_path / "data.npz", **calibration)  # type: ignore[arg-type]
    np.savez(tmp_path / "eval.npz", **held_back)  # type: ignore[arg-type]
    result = optimize_model(
        source("ppocr_cls"),
        tmp_path / "pack",
        name="ppocr-cls",
        version=1,
        data=tmp_path / "data.npz",
        eval_data=tmp_path / "eval.npz",
        prune="off",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=2,
        time_budget=20,
    )
    rows = {r["candidate"]: r for r in result.rows}
    chosen = rows[result.chosen.name]
    assert chosen["within_budget"]
    if result.chosen.name == "fp32":
        assert result.reason.startswith("kept FP32")
    else:  # a quantized pick keeps the deciding metric and is faster by the search's figures
        assert chosen["fidelity"]["decisive_value"] >= 0.99
        assert chosen["speedup"] >= 1.0
    # No candidate within the budget is faster than the pick by more than the pick's noise
    # margin (5%), or 10% more for one whose rows depend on their neighbours.
    for row in rows.values():
        if row["within_budget"] and row["candidate"] != result.chosen.name:
            margin = 1.05 * (1.10 if row["row_independent"] is False else 1.0)
            assert row["speedup"] <= chosen["speedup"] * margin + 1e-9, row
    # Every candidate has figures or says why not (a starved machine may leave some untried).
    for row in rows.values():
        assert row["error"] or row["fidelity"], row
    # Judged on the held-back real lines, on the CPU the report names.
    assert result.machine["flags"] is not None
    pack = load_pack(tmp_path / "pack", trusted=[], allow_unsigned=True)
    samples = pack.samples
    assert samples is not None
    got = Predictor.from_pack(pack).run(samples.inputs)
    for name, expected in samples.outputs.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5)
