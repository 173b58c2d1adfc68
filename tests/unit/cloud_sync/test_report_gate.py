from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.report_gate import read_verdict, verdict_of
from modelpack.errors import PackError


def test_verdict_fields_in_order() -> None:
    assert verdict_of({"within_budget": False}).within_budget is False
    assert verdict_of({"passed": True}).within_budget is True
    chosen = {"chosen": {"within_budget": False, "fidelity": {"top1_agreement": 0.9}}}
    verdict = verdict_of(chosen)
    assert verdict.within_budget is False and verdict.fidelity == "top1_agreement=0.9"
    listed = {"candidates": [{"name": "a"}, {"chosen": True, "within_budget": True}]}
    assert verdict_of(listed).within_budget is True
    assert verdict_of({"fidelity": 0.998}).within_budget is None
    assert verdict_of({"fidelity": 0.998}).fidelity == "0.998"


def test_read_verdict_from_a_pack(tmp_path: Path) -> None:
    assert read_verdict(tmp_path).within_budget is None
    (tmp_path / "report.json").write_text(json.dumps({"within_budget": True}))
    assert read_verdict(tmp_path).within_budget is True
    for hostile in ("{not json", '{"n": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000):
        # the last two raised ValueError and RecursionError, past the publish's refusal
        (tmp_path / "report.json").write_text(hostile)
        with pytest.raises(PackError, match=r"report\.json is not JSON"):
            read_verdict(tmp_path)


def test_the_optimize_report_layout() -> None:
    """optimize/report.py: "chosen" names a candidate; each candidate row has its verdict."""
    report = {
        "chosen": "int8",
        "candidates": [
            {"candidate": "fp32", "within_budget": True, "chosen": False, "fidelity": None},
            {
                "candidate": "int8",
                "within_budget": False,
                "chosen": True,
                "fidelity": {"accuracy": None, "top1_agreement": 0.95, "cosine_min": 0.97},
            },
        ],
    }
    verdict = verdict_of(report)
    assert verdict.within_budget is False
    assert verdict.fidelity == "top1_agreement=0.95, cosine_min=0.97"
