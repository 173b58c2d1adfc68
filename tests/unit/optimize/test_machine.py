"""``optimize.machine.u8s8_saturates``: whether this CPU's int8 kernels saturate 8-bit weights,
which decides the weights' width that smoothing is judged and planned with
(``optimize.search.smooth_scored``)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from optimize.machine import u8s8_saturates
from optimize.search import smooth_scored


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n")
    return path


@pytest.mark.parametrize(
    ("flags", "saturates"),
    [
        ("avx avx2 fma", True),  # AVX2 alone: vpmaddubsw sums pairs in 16 bits
        ("avx avx2 avx512f avx512bw", True),  # AVX-512 without VNNI saturates as well
        ("avx avx2 avx512f avx512_vnni", False),
        ("avx avx2 avx_vnni", False),
        ("avx avx2 amx_tile amx_int8", False),
        ("sse4_2", False),  # no AVX2: not a kernel this rule knows
    ],
)
def test_x86_saturates_without_vnni_or_amx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, saturates: bool
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert u8s8_saturates(_cpuinfo(tmp_path, flags)) is saturates


def test_other_architectures_never_take_7_bit_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert u8s8_saturates(_cpuinfo(tmp_path, "avx2")) is False


def test_smoothing_is_judged_with_the_weights_this_cpu_keeps() -> None:
    assert smooth_scored().reduce_range is u8s8_saturates()
    assert smooth_scored().op_types == ("MatMul",)
