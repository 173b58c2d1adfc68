"""Where a device's word on its certificate disagrees with the store's record: flagged, never
acted on (cloud_sync.identity_view.reported_mismatch)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.identity_view import reported_mismatch
from cloud_sync.protocol import ModelRef, Status

SERIALS = st.sampled_from(["a1", "b2", None])
TIMES = st.one_of(st.none(), st.floats(0, 1e10, allow_nan=False))


@settings(max_examples=200)
@given(
    serial=SERIALS, said_serial=SERIALS, not_after=TIMES, said_after=TIMES,
    revoked=st.booleans(), said_state=st.sampled_from(["valid", "expired", "renewal_refused"]),
)  # fmt: skip
def test_a_mismatch_is_named_exactly_when_the_two_disagree(
    serial: str | None,
    said_serial: str | None,
    not_after: float | None,
    said_after: float | None,
    revoked: bool,
    said_state: str,
) -> None:
    row = {"serial": serial, "not_after": not_after, "revoked": revoked}
    reported = {"serial": said_serial, "not_after": said_after, "state": said_state}
    found = reported_mismatch(row, reported)
    assert ("serial" in found) == bool(serial and said_serial and serial != said_serial)
    far = not_after is not None and said_after is not None and abs(not_after - said_after) > 1
    assert ("not_after" in found) == far
    assert ("revoked" in found) == (revoked and said_state == "valid")


def test_a_device_the_store_never_issued_a_certificate_is_flagged() -> None:
    assert reported_mismatch(None, {"state": "valid", "serial": "a1"}) == ["no record"]


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=100)
@given(
    identity=JSON
    | st.fixed_dictionaries({"state": st.text(max_size=64)}, optional={"serial": JSON})
)
def test_whatever_a_device_says_of_its_certificate_the_rest_of_its_status_stands(
    identity: object,
) -> None:
    """The part of a status the cloud never trusts cannot cost the parts it reads."""
    doc = {
        "device": "d",
        "state": "online",
        "model": {"name": "m", "version": 3},
        "identity": identity,
    }
    status = Status.model_validate_json(json.dumps(doc))
    assert (status.device, status.state, status.model) == (
        "d",
        "online",
        ModelRef(name="m", version=3),
    )
    assert status.identity is None or isinstance(status.identity.state, str)
