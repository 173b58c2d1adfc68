"""The images benchmark's verdict "at least as fast as FP32", judged against FP32 timed against
itself in the same rounds (the A/A control): a pick slower than FP32 by no more than FP32
differs from itself is as fast as the rounds can tell; one further off is slower, by wall or by
CPU time."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.bench_optimize_images import _line, judge
from benchmarks.runs import summary


def _figures(wall: list[float], cpu: list[float]) -> dict[str, Any]:
    return {"speedup": summary(wall), "speedup_by_cpu": summary(cpu)}


def test_a_pick_within_fp32s_own_spread_is_as_fast() -> None:
    itself = _figures([0.97, 1.01, 1.02], [0.98, 1.0, 1.015])
    verdict = judge(_figures([0.96, 0.975, 1.0], [0.97, 0.985, 0.99]), itself)
    assert verdict["speedup"] == {"median": 0.975, "floor": 0.97, "as_fast": True}
    assert verdict["speedup_by_cpu"] == {"median": 0.985, "floor": 0.98, "as_fast": True}
    assert verdict["as_fast"] is True


def test_a_pick_slower_than_the_noise_by_cpu_time_is_slower() -> None:
    # The last run's ppocr_cls: 1.011x by wall but 0.927x (0.915-0.933) by CPU time; had FP32
    # read 0.99-1.01 against itself, the pick was slower than the rounds' noise allows.
    itself = _figures([0.89, 1.0, 1.05], [0.99, 1.0, 1.01])
    verdict = judge(_figures([0.89, 1.011, 1.023], [0.915, 0.927, 0.933]), itself)
    assert verdict["speedup"]["as_fast"] is True  # by wall the noise is 11 %
    assert verdict["speedup_by_cpu"] == {"median": 0.927, "floor": 0.99, "as_fast": False}
    assert verdict["as_fast"] is False


def test_one_round_judges_plain_numbers() -> None:
    verdict = judge(
        {"speedup": 0.98, "speedup_by_cpu": 1.0}, {"speedup": 1.03, "speedup_by_cpu": 1.0}
    )
    assert verdict["speedup"] == {"median": 0.98, "floor": 0.97, "as_fast": True}
    assert verdict["speedup_by_cpu"] == {"median": 1.0, "floor": 1.0, "as_fast": True}


speeds = st.lists(st.floats(0.5, 1.5), min_size=1, max_size=7)


@given(speeds, speeds)
def test_a_pick_timed_like_one_of_fp32s_own_rounds_is_as_fast(
    wall: list[float], cpu: list[float]
) -> None:
    # The pick's rounds are FP32's own against itself: identical models read as identical.
    itself = _figures(wall, cpu)
    assert judge(itself, itself)["as_fast"] is True


def test_the_headline_puts_the_pick_beside_fp32_against_itself() -> None:
    found = {
        "chosen": "fp32",
        "same_model_as_fp32": True,
        "decided_by": "x top1@mean",
        "fidelity": 1.0,
        "seconds_to_pick": 12.0,
        "side_by_side": {"edgebento": _figures([0.98, 0.99, 1.0], [0.99, 1.0, 1.0])},
        "fp32_vs_itself": _figures([0.97, 1.0, 1.02], [0.99, 1.0, 1.01]),
    }
    line = _line("ppocr_cls", found)
    assert line.startswith(
        "ppocr_cls: fp32, the source's bytes (0.990x (0.980x–1.000x, 3 runs) FP32"
    )
    assert (
        "FP32 vs itself 1.000x (0.970x–1.020x, 3 runs), 1.000x (0.990x–1.010x, 3 runs) by CPU"
        in line
    )
    # A result from before the control (no fp32_vs_itself) still reads.
    assert "vs itself" not in _line("old", found | {"fp32_vs_itself": None})
