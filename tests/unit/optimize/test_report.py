from __future__ import annotations

import base64
import json
from pathlib import Path

from optimize import optimize_model


def test_report_has_table_chart_and_footprint(
    mlp_data: Path, wide_mlp: Path, tmp_path: Path
) -> None:
    result = optimize_model(
        wide_mlp,
        tmp_path / "pack",
        name="mlp",
        version=2,
        data=mlp_data,
        prune=0.5,
        quantize="dynamic",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.2,
    )
    report = json.loads(result.report_json.read_text())
    assert report["budget"] == "accuracy drop <= 1.00 points"
    assert report["decided_by"] == ["logits accuracy@mean"]
    assert report["fidelity_data"] == "held-back data"
    names = [c["candidate"] for c in report["candidates"]]
    assert names[:2] == ["fp32", "dynamic"] and "prune-50%" in names
    chosen = [c for c in report["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["candidate"] == result.chosen.name == report["chosen"]
    for row in report["candidates"]:
        assert row["latency"]["p50_ms"] > 0 and row["size_bytes"] > 0
        assert row["fidelity"]["accuracy"] is not None
    assert {s["name"] for s in report["footprint"]} >= {
        "normalize",
        "prune",
        "preprocess",
        "quantize",
    }
    html = result.report_html.read_text()
    for name in names:
        assert name in html
    png = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    assert result.rows == report["candidates"]


def test_second_run_reuses_cached_passes(mlp_data: Path, wide_mlp: Path, tmp_path: Path) -> None:
    kwargs = dict(
        name="mlp",
        version=1,
        data=mlp_data,
        prune="off",
        quantize="dynamic",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.1,
    )
    optimize_model(wide_mlp, tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    again = optimize_model(wide_mlp, tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    steps = json.loads(again.report_json.read_text())["footprint"]
    assert steps and all(s["cached"] for s in steps)
