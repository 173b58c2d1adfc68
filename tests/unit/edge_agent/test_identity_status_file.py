"""The identity part of the agent's status, read from identity/status.json: bounded to the
protocol's limits whatever the file holds, absent for certificates the operator manages."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import CertificateReport, Status
from edge_agent.identity_status import IdentityStatus

JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=700),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["state", "serial", "issuer", "reason", "not_before", "not_after", "renew_after", "x"]
)


def _own(tmp: Path) -> IdentityStatus:
    (tmp / "identity").mkdir(exist_ok=True)
    return IdentityStatus(tmp, tmp / "identity" / "device.crt")


# The file is rewritten for each example: nothing carries over between them.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=st.dictionaries(KEYS, JSON, max_size=8) | JSON)
def test_whatever_the_file_holds_the_status_stays_valid(tmp_path: Path, doc: object) -> None:
    identity = _own(tmp_path)
    (tmp_path / "identity" / "status.json").write_text(json.dumps(doc))
    report = identity.report(1_000.0)
    if report is not None:
        CertificateReport.model_validate(report)  # never a status the cloud would refuse
        Status.model_validate({"device": "d", "state": "online", "identity": report})


def test_days_left_and_rotation_due_come_from_the_times(tmp_path: Path) -> None:
    identity = _own(tmp_path)
    doc = {"state": "valid", "serial": "ab", "not_after": 86_400 * 3.0, "renew_after": 100.0}
    (tmp_path / "identity" / "status.json").write_text(json.dumps(doc))
    assert identity.changed()
    report = identity.report(0.0)
    assert report == {**doc, "days_left": 3.0, "rotation_due": False}
    assert not identity.changed()  # reported: nothing new until the file is written again
    assert identity.report(200.0)["rotation_due"] is True  # type: ignore[index]


def test_an_operator_managed_certificate_is_not_reported(tmp_path: Path) -> None:
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "status.json").write_text('{"state": "valid"}')
    assert IdentityStatus(tmp_path, tmp_path / "mine.crt").report(0.0) is None
    assert IdentityStatus(tmp_path, None).report(0.0) is None
    assert not IdentityStatus(tmp_path, None).changed()
