"""Service ports picked in slices: the test suite's workers (pytest-xdist) start services side by
side, and two of them must never pick the same port between one's pick and its bind."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgebento import localports


def test_each_slice_is_its_own_part_of_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(localports.SLICE_ENV, raising=False)
    whole = localports._port_range()
    parts = []
    for k in range(3):
        monkeypatch.setenv(localports.SLICE_ENV, f"{k}/3")
        parts.append(localports._port_range())
        picked = {localports.free_port() for _ in range(20)}
        assert all(parts[-1][0] <= port < parts[-1][1] for port in picked), (parts[-1], picked)
    assert parts[0][0] == whole[0] and parts[-1][1] <= whole[1]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(parts))  # disjoint, in order


@pytest.mark.parametrize("text", ["", "2/2", "5/2", "-1/2", "1/0", "0/65", "a/b", "1/2/3", "1"])
def test_a_value_that_is_no_slice_is_the_whole_range(text: str) -> None:
    assert localports._slice(text) == (0, 1)


@given(st.text(max_size=12))
def test_only_k_of_n_with_k_below_n_is_a_slice(text: str) -> None:
    k, n = localports._slice(text)
    if (k, n) != (0, 1):
        k_text, n_text = text.split("/")
        assert (int(k_text), int(n_text)) == (k, n) and 0 <= k < n <= 64
