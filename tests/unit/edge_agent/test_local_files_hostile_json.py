"""The agent's own files, spoiled with what Python's JSON parser refuses past JSONDecodeError (a
5,000-digit integer: ValueError; 5,000-deep nesting: RecursionError) or reads as a number no
code expects (1e999: infinity, whose int() raised OverflowError): each is read as an unreadable
file is, never an exception that stops the agent."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.identity_status import IdentityStatus
from edge_agent.state import InstallState, read_state

SPOILED = {
    "digits": '{"current": "m-v1", "highest": {"m": ' + "1" * 5000 + "}}",
    "deep": '{"current": "m-v1", "history": ' + "[" * 5000 + "]" * 5000 + "}",
    "infinity": '{"current": "m-v1", "highest": {"m": 1e999}}',
    "nan": '{"current": "m-v1", "highest": {"m": NaN}}',
}


@pytest.mark.parametrize("kind", sorted(SPOILED))
def test_a_spoiled_state_file_falls_back_to_the_packs_on_disk(tmp_path: Path, kind: str) -> None:
    (tmp_path / "packs" / "m-v3-0123456789ab").mkdir(parents=True)
    (tmp_path / "state.json").write_text(SPOILED[kind])
    state = read_state(tmp_path / "state.json", tmp_path / "packs")
    assert state == InstallState(highest=(("m", 3),))  # the marks the pack dirs give


@given(
    st.sampled_from(["not_after", "renew_after", "not_before"]),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "1" * 400, "1" * 5000, "[" * 5000]),
)
def test_a_time_in_the_status_file_that_is_no_finite_number_is_left_out(
    tmp_path_factory: pytest.TempPathFactory, field: str, literal: str
) -> None:
    root = tmp_path_factory.mktemp("status")
    (root / "identity").mkdir()
    (root / "identity" / "status.json").write_text(
        f'{{"state": "valid", "serial": "ab", "{field}": {literal}}}'
    )
    report = IdentityStatus(root, root / "identity" / "device.crt").report(0.0)
    assert report is None or report == {"state": "valid", "serial": "ab"}
