"""No cloud identity but the enrollment service may speak on a device's enrollment topics,
through a real Mosquitto running the ACL ``edgebento fleet broker-config`` generates, with the
real enrollment service answering.

Enrollment topics are ``edgebento/enroll/{device}/{kind}``, and the cloud's grants have ``+``
at the second level, which matches ``enroll``: ``topic write edgebento/+/cmd/#`` (operator,
controller) and ``edgebento/+/replies/#`` granted ``edgebento/enroll/cmd/#`` and
``edgebento/enroll/replies/#``. Before, a device could be called ``cmd`` or ``replies``: the
operator could send it a forged refusal with a ``retry_after_s`` of a year, and renew in its
name with a CSR of its own (answered ``ok``). Now those ids are reserved
(``cloud_sync.reserved_ids``), and a record enrolled under one before is refused renewal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud_sync.enroll import KINDS, enroll_topic
from cloud_sync.fleet_ca import new_key
from cloud_sync.reserved_ids import RESERVED_IDS
from cloud_sync.rollout_state import DEVICE_ID
from edge_agent.identity import KeyMaker
from tests.integration.test_issue20_claim_acl import NOT_AUTHORIZED, _publish_all
from tests.support.agent import wait_for
from tests.support.identity_fleet import PREFIX, IdentityFleet, TlsClient, claim_request

CLOUD = ("operator", "controller", "sync")  # every cloud identity but the enrollment service


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("enrolltopics")).start()
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def cloud(idfleet: IdentityFleet) -> Iterator[dict[str, TlsClient]]:
    clients = {name: idfleet.client(name) for name in CLOUD}
    yield clients
    for client in clients.values():
        client.close()


def _forged(device: str) -> list[tuple[str, bytes]]:
    """A request of each kind and an answer that would keep ``device`` waiting for a year."""
    refusal = {"id": "forged", "ok": False, "reason": "renewal_budget", "retry_after_s": 3.15e7}
    request = claim_request(KeyMaker().csr(new_key(), device), "ebc1.forged")
    topics = [(enroll_topic(PREFIX, device, kind), request) for kind in KINDS]
    return [*topics, (enroll_topic(PREFIX, device, "response"), json.dumps(refusal).encode())]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(device=st.from_regex(DEVICE_ID.pattern, fullmatch=True))
@example(device="cmd")
@example(device="replies")
@example(device="cmd-1")
def test_no_cloud_identity_but_the_enrollment_service_speaks_on_a_devices_enroll_topics(
    cloud: dict[str, TlsClient], device: str
) -> None:
    if device in RESERVED_IDS:
        return  # no device may enroll under it (test_reserved_ids)
    for name, client in cloud.items():
        codes = _publish_all(client, list(_forged(device)))
        assert set(codes.values()) == {NOT_AUTHORIZED}, (name, device, codes)


def test_a_renewal_in_a_reserved_ids_name_gets_no_certificate(idfleet: IdentityFleet) -> None:
    """A device enrolled as ``cmd`` by the previous release: the operator, whose ACL lets it
    publish on ``edgebento/enroll/cmd/renew`` and read the answer, asks for a certificate in
    its name with a key of its own. It was issued one; now it is refused."""
    enrolled = idfleet.ca.sign_device_csr(KeyMaker().csr(new_key(), "cmd"), "cmd", 1)
    idfleet.ids.record_issue("cmd", enrolled, "claim")
    operator = idfleet.client("operator")
    try:
        answers = operator.collect(enroll_topic(PREFIX, "cmd", "response"))
        request = claim_request(KeyMaker().csr(new_key(), "cmd"), None)
        request_id = json.loads(request)["id"]
        # Allowed by the ACL (the id is reserved, the grant stays): the service must refuse.
        operator.client.publish(enroll_topic(PREFIX, "cmd", "renew"), request, qos=1)
        answer: Any = wait_for(answers, lambda d: d.get("id") == request_id, 30)
    finally:
        operator.close()
    assert not answer["ok"] and "certificate" not in answer, answer
    assert answer["reason"] == "bad_request" and "reserved" in answer["error"], answer
    record = idfleet.ids.device("cmd")
    assert record is not None and len(record.certificates) == 1, record


@pytest.mark.parametrize("other", ["cam-b", "cam-a-1", "cam", "cmd"])
def test_a_device_speaks_on_its_own_enroll_topics_only(idfleet: IdentityFleet, other: str) -> None:
    """A device's grants (``pattern write edgebento/enroll/%u/renew``, ``.../rotated``) name
    its own id: another device's enrollment topics, one whose id it is a prefix of or that
    is a prefix of it included, are refused (PUBACK 135); its own renewal topics are not."""
    device = idfleet.client("cam-a")
    try:
        codes = _publish_all(device, list(_forged(other)))
        own = _publish_all(device, [enroll_topic(PREFIX, "cam-a", k) for k in ("renew", "rotated")])
    finally:
        device.close()
    assert set(codes.values()) == {NOT_AUTHORIZED}, codes
    assert NOT_AUTHORIZED not in own.values(), own
