from __future__ import annotations

from pathlib import Path

from optimize.metrics import Score
from optimize.pick import Budget, Candidate, pick
from optimize.verify import Fidelity, Latency, Size


def _fid(accuracy: float | None, cosine: float = 1.0, top1: float | None = None) -> Fidelity:
    """A Fidelity whose deciding scores are those the default metrics give a classifier."""
    scores = []
    if accuracy is not None:
        scores.append(Score("logits", "accuracy@mean", accuracy, 0.95, 0.94, True, True))
    if top1 is not None:
        scores.append(Score("logits", "top1@mean", top1, 1.0, 0.99, True, accuracy is None))
    scores.append(Score("logits", "cosine@min", cosine, 1.0, 0.99, True, accuracy is None))
    return Fidelity(accuracy, top1, cosine, cosine, 0.0, tuple(scores))


REF = _fid(0.95)


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
    ok = _fid(0.941, cosine=0.5, top1=0.9)  # agreement and cosine do not decide with labels
    assert budget.violation(REF, ok) is None
    assert ok.decided_by == "logits accuracy@mean"
    bad = _fid(0.93)
    assert budget.violation(REF, bad) == "logits accuracy@mean 0.9300 < 0.9400"
    assert budget.describe() == "accuracy drop <= 1.00 points"


def test_budget_without_labels_needs_agreement_and_cosine() -> None:
    budget = Budget(0.01, labels=False)
    assert budget.violation(REF, _fid(None, 0.992, 0.995)) is None
    assert budget.violation(REF, _fid(None, 1.0, 0.98)) == "logits top1@mean 0.9800 < 0.9900"
    assert "logits cosine@min 0.9850" in str(budget.violation(REF, _fid(None, 0.985, 1.0)))
    # The score nearest its bound is the one that decided.
    assert _fid(None, 0.995, 0.999).decided_by == "logits cosine@min"


def test_pick_fastest_within_budget_then_smallest_among_ties() -> None:
    b = Budget(0.01, labels=True)
    good = _fid(0.95)
    cands = [
        _cand("fp32", 10.0, 1000, good, b),
        _cand("fast-but-wrong", 2.0, 100, _fid(0.80), b),
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
        _cand("wrong", 2.0, 100, _fid(0.5), b),
        _cand("no-faster", 9.8, 300, REF, b),  # 2% faster is noise on a shared CPU
        Candidate("broken", ("broken",), None, {}, error="ValueError: bad graph"),
    ]
    choice = pick(cands)
    assert choice.candidate.name == "fp32"
    assert choice.reason == "kept FP32: no candidate is faster than FP32 within the budget"
