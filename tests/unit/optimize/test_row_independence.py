"""Row independence as a property of each candidate: dynamic int8 scales a whole batch at once,
so a row's answer changes with its neighbours and the service runs such a model one request
at a time; the search times it so, says so, and prefers a row-independent pick when close."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack import Predictor
from modelpack.iosig import read_io_signature
from modelpack.serving.core import ServingCore
from optimize import optimize_model
from optimize.pick import ROW_MARGIN, Candidate, pick
from optimize.verify import Fidelity, Latency, Size

BATCH = 64


def test_each_candidate_is_timed_as_the_service_runs_it(
    wide_mlp: Path, mlp_data: Path, tmp_path: Path
) -> None:
    result = optimize_model(
        wide_mlp,
        tmp_path / "pack",
        name="mlp",
        version=1,
        data=mlp_data,
        prune="off",
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.2,
        max_drop=0.5,
    )
    report = json.loads(result.report_json.read_text())
    rows = {r["candidate"]: r for r in report["candidates"]}
    eval_rows = 29  # 30% of the 96 rows is held back
    assert rows["fp32"]["row_independent"] is True and rows["fp32"]["latency"]["batch"] == eval_rows
    # "auto" on a graph without convolutions still tries one static QDQ: int8 rows stay apart.
    static = rows["static minmax per-channel"]
    assert static["row_independent"] is True and static["batching_off"] is None
    assert static["latency"]["batch"] == eval_rows
    dynamic = [r for name, r in rows.items() if name.startswith("dynamic")]
    assert len(dynamic) == 5
    core = ServingCore()
    for row in dynamic:
        assert row["row_independent"] is False
        assert row["latency"]["batch"] == 1  # one request at a time
        assert row["latency"]["ms_per_row"] == row["latency"]["p50_ms"]
        # The serving core, given the same model, refuses to batch it for the same reason.
        path = next(c.path for c in result.candidates if c.name == row["candidate"])
        assert path is not None
        inputs, outputs = read_io_signature(path)
        served = core.serve(Predictor(path, inputs, outputs)).metadata()
        assert served["batching"] is False and served["batching_off"] == row["batching_off"]
    base = rows["fp32"]["latency"]["ms_per_row"]
    for row in report["candidates"]:
        if row["latency"]:
            assert row["speedup"] == round(base / row["latency"]["ms_per_row"], 3)
    html = result.report_html.read_text()
    assert "mixed" in html and "independent" in html and "batch served" in html


def _fid() -> Fidelity:
    return Fidelity(None, 1.0, 1.0, 1.0, 0.0)


def _cand(name: str, ms_per_row: float, independent: bool, gzip: int = 100) -> Candidate:
    batch = BATCH if independent else 1
    ms = ms_per_row * batch
    return Candidate(
        name,
        (name,),
        Path(f"{name}.onnx"),
        {},
        _fid(),
        Latency(ms_per_row, ms_per_row, ms, ms, batch),
        Size(gzip * 2, gzip),
        row_independent=independent,
        batching_off=None if independent else "output 'y' of a row changes",
    )


FP32 = _cand("fp32", 1.0, True, gzip=400)


def test_a_static_candidate_close_to_a_dynamic_one_is_picked() -> None:
    static = _cand("static minmax per-channel", 0.52, True)
    dynamic = _cand("dynamic per-channel", 0.50, False, gzip=90)  # 4% faster and smaller
    choice = pick([FP32, dynamic, static])
    assert choice.candidate is static
    assert (
        "preferred to dynamic per-channel, whose rows depend on their neighbours" in choice.reason
    )
    assert "1.04x" in choice.reason


def test_a_row_dependent_candidate_wins_only_when_clearly_faster() -> None:
    static = _cand("static minmax per-channel", 0.60, True)
    dynamic = _cand("dynamic per-channel", 0.50, False)  # 1.2x: more than ROW_MARGIN
    choice = pick([FP32, dynamic, static])
    assert choice.candidate is dynamic
    assert "served one request at a time" in choice.reason
    # Close to FP32 and nothing else: FP32 keeps batching.
    near = _cand("dynamic", 0.93, False)
    kept = pick([FP32, near])
    assert kept.candidate is FP32 and kept.reason.startswith("kept FP32: preferred to dynamic")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.05, 2.0), st.booleans(), st.integers(10, 1000)),
        min_size=1,
        max_size=6,
    )
)
def test_a_row_dependent_pick_always_beats_every_row_independent_choice_by_the_margin(
    specs: list[tuple[float, bool, int]],
) -> None:
    cands = [FP32] + [_cand(f"c{i}", ms, ind, gz) for i, (ms, ind, gz) in enumerate(specs)]
    chosen = pick(cands).candidate
    ms = chosen.latency.ms_per_row if chosen.latency else 0.0
    if chosen.row_independent is False:
        for other in cands:
            if other.row_independent and other.latency:
                assert other.latency.ms_per_row > ms * (1 + ROW_MARGIN)
    # Never slower than the fastest row-independent choice by more than the margin.
    fastest_independent = min(
        c.latency.ms_per_row for c in cands if c.row_independent and c.latency
    )
    assert ms <= fastest_independent * (1 + ROW_MARGIN) * 1.05 + 1e-12
