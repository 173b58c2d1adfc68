from __future__ import annotations

from pathlib import Path

from optimize.pick import Budget, Candidate, pick
from optimize.verify import Fidelity, Latency, Size

REF = Fidelity(accuracy=0.95, top1_agreement=1.0, cosine_min=1.0, cosine_mean=1.0, max_abs_error=0)


def _cand(name: str, ms: float, gzip: int, fid: Fidelity, budget: Budget) -> Candidate:
    return Candidate(
        name,
        (name,),
        Path(f"{name}.onnx"),
        {},
        fid,
        Latency(ms, ms, ms, ms, 32),
        Size(gzip * 2, gzip),
        None,
        budget.violation(REF, fid),
    )


def test_budget_with_labels_counts_accuracy_points() -> None:
    budget = Budget(0.01, labels=True)
    ok = Fidelity(0.941, 0.9, 0.5, 0.9, 1.0)  # agreement and cosine do not matter with labels
    assert budget.violation(REF, ok) is None
    bad = Fidelity(0.93, 1.0, 1.0, 1.0, 0.0)
    assert budget.violation(REF, bad) == "accuracy drops 2.00 points (budget 1.00)"


def test_budget_without_labels_needs_agreement_and_cosine() -> None:
    budget = Budget(0.01, labels=False)
    assert budget.violation(REF, Fidelity(None, 0.995, 0.992, 0.999, 0.1)) is None
    assert "top-1 agreement 0.9800" in str(budget.violation(REF, Fidelity(None, 0.98, 1.0, 1.0, 0)))
    assert "cosine_min 0.9850" in str(budget.violation(REF, Fidelity(None, 1.0, 0.985, 1.0, 0)))
    assert budget.describe() == "top-1 agreement >= 99.00% and cosine_min >= 0.9900"


def test_pick_fastest_within_budget_then_smallest_among_ties() -> None:
    b = Budget(0.01, labels=True)
    good = Fidelity(0.95, 1.0, 1.0, 1.0, 0.0)
    cands = [
        _cand("fp32", 10.0, 1000, good, b),
        _cand("fast-but-wrong", 2.0, 100, Fidelity(0.80, 0.8, 0.5, 0.9, 1.0), b),
        _cand("int8", 4.0, 300, good, b),
        _cand("int8-sparse", 4.1, 150, good, b),  # within 5% of int8: the smaller one wins
        _cand("slow", 9.9, 900, good, b),
    ]
    choice = pick(cands)
    assert choice.candidate.name == "int8-sparse"
    assert "2.44x faster than FP32" in choice.reason


def test_pick_keeps_fp32_and_says_why() -> None:
    b = Budget(0.01, labels=True)
    cands = [
        _cand("fp32", 10.0, 1000, REF, b),
        _cand("wrong", 2.0, 100, Fidelity(0.5, 0.5, 0.5, 0.5, 1.0), b),
        _cand("no-faster", 9.8, 300, REF, b),  # 2% faster is noise on a shared CPU
        Candidate("broken", ("broken",), None, {}, error="ValueError: bad graph"),
    ]
    choice = pick(cands)
    assert choice.candidate.name == "fp32"
    assert choice.reason == "kept FP32: no candidate is faster than FP32 within the budget"
