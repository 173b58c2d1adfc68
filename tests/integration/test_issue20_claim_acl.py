"""Issue 20, item 3: "the claim identity gets only the enrollment topics", through a real
Mosquitto running the configuration ``cloud_sync.broker_config`` generates (what ``edgebento
fleet broker-config`` writes), with the real enrollment service answering.

Before, one ACL served both listeners and its ``pattern`` lines apply to every user: the shared
claim certificate had the rights of a device called ``claim`` (its status, telemetry, replies
and renewal topics; its commands, requests, desired state and acknowledgements) and read every
group command, on either listener. Now each listener has its own ACL
(``per_listener_settings true``): on the claim listener the claim certificate may publish
claims and read answers, and nobody else may do anything; on the device listener it gets
nothing (``topic deny #``, checked before any grant, patterns included).

"Nothing gets through" is checked against something that must: a client's messages are
delivered in the order the broker routed them, and the broker routes a QoS 1 message before it
acknowledges it, so once a marker sent after the refused messages arrived (or once a PUBACK
sent after them came back on the subscriber's own connection), they would have arrived before.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.enroll import enroll_topic
from cloud_sync.fleet_ca import new_key
from cloud_sync.revocation import _reloaded
from edge_agent.identity import KeyMaker
from tests.support.identity_fleet import PREFIX, IdentityFleet, TlsClient, claim_request

NOT_AUTHORIZED = 135  # MQTT 5 reason code of a PUBACK for a publish the ACL refused


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idclaimacl")).start()
    yield fleet
    fleet.stop()


def _csr(device: str) -> bytes:
    return KeyMaker().csr(new_key(), device)


DEVICE_LEAVES = (
    "status",
    "telemetry",
    "replies/r1",
    "cmd/ping",
    "infer",
    "desired",
    "telemetry/ack",
)


def _device_topics(device: str) -> list[str]:
    """Everything of a device's that only the device or the cloud may publish."""
    return [f"{PREFIX}/{device}/{leaf}" for leaf in DEVICE_LEAVES]


def _forbidden_writes(device: str) -> list[str]:
    """What the claim certificate must not publish: any device's topics, its own as a device
    called ``claim`` (what the patterns gave it), group commands, renewals and answers."""
    return [
        *_device_topics(device),
        *_device_topics("claim"),
        f"{PREFIX}/group/g1/cmd/ping",
        enroll_topic(PREFIX, device, "renew"),
        enroll_topic(PREFIX, device, "rotated"),
        enroll_topic(PREFIX, device, "response"),
        enroll_topic(PREFIX, "claim", "renew"),
        enroll_topic(PREFIX, "claim", "rotated"),
    ]


def _publish_all(client: TlsClient, messages: list[str | tuple[str, bytes]]) -> dict[str, int]:
    """Each message (a topic, or a topic and its payload) published at QoS 1, one after the
    other: the PUBACK's reason code by topic (0 or 16 accepted, 135 refused by the ACL). Every
    PUBACK is in when it returns."""
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with lock:
            codes[mid] = int(reason.value)

    client.client.on_publish = on_publish
    sent: dict[str, int] = {}
    for message in messages:
        topic, payload = message if isinstance(message, tuple) else (message, b'{"id":"forged"}')
        info = client.client.publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        assert info.is_published(), f"no PUBACK for {topic} within 30 s"
        sent[topic] = info.mid
    with lock:
        return {topic: codes[mid] for topic, mid in sent.items()}


def _accepted(codes: dict[str, int]) -> dict[str, int]:
    return {topic: code for topic, code in codes.items() if code != NOT_AUTHORIZED}


def _until(q: queue.Queue[mqtt.MQTTMessage], marker: str, timeout: float = 30) -> list[str]:
    """The topics of what arrived on ``q`` before the message whose id is ``marker``."""
    before: list[str] = []
    while True:
        msg = q.get(timeout=timeout)
        if json.loads(msg.payload).get("id") == marker:
            return before
        before.append(msg.topic)


def _flush(client: TlsClient) -> None:
    """A PUBACK on ``client``'s own connection: whatever the broker routed to it before has
    been handed to its callbacks once this returns (one connection, one ordered stream)."""
    _publish_all(client, [f"{PREFIX}/flush/{uuid.uuid4().hex[:8]}"])


def _send_the_cloud_and_device_traffic(fleet: IdentityFleet, device: str) -> None:
    """What a device ``device`` and a device called ``claim`` are sent or send, each by the
    identity whose right it is; all of it acknowledged (routed) when this returns."""
    clients = [fleet.client(name) for name in ("operator", "controller", "sync", device)]
    operator, controller, sync, dev = clients
    codes: dict[str, int] = {}
    try:
        for target in (device, "claim"):
            codes |= _publish_all(
                operator, [f"{PREFIX}/{target}/{t}" for t in ("cmd/ping", "infer")]
            )
            codes |= _publish_all(controller, [f"{PREFIX}/{target}/desired"])
            codes |= _publish_all(sync, [f"{PREFIX}/{target}/telemetry/ack"])
        codes |= _publish_all(controller, [f"{PREFIX}/group/g1/cmd/ping"])
        codes |= _publish_all(dev, [f"{PREFIX}/{device}/{t}" for t in ("status", "telemetry")])
    finally:
        for client in clients:
            client.close()
    assert _accepted(codes) == codes, codes  # the control: each was its sender's right


def test_on_the_claim_listener_the_claim_identity_claims_and_reads_only_its_answer(
    idfleet: IdentityFleet,
) -> None:
    """It subscribes to everything; devices and the cloud send what a device (``cla-a``, and
    one called ``claim``) and a group get; it sends a valid claim: the first thing it gets is
    that claim's answer, a certificate."""
    claim = idfleet.client("claim", claim=True)
    everything = claim.collect(f"{PREFIX}/#")
    _send_the_cloud_and_device_traffic(idfleet, "cla-a")
    token = idfleet.ids.create_claims(["cla-b"], ttl_s=600)["cla-b"]
    request = claim_request(_csr("cla-b"), token)
    sent = _publish_all(claim, [(enroll_topic(PREFIX, "cla-b", "claim"), request)])
    assert _accepted(sent) == sent, sent
    answer = everything.get(timeout=30)
    # Not even its own claim came back (it may write claims, not read them): the answer.
    assert answer.topic == enroll_topic(PREFIX, "cla-b", "response"), answer.topic
    doc = json.loads(answer.payload)
    assert (doc["id"], doc["ok"]) == (json.loads(request)["id"], True), doc
    _flush(claim)
    assert everything.empty(), [m.topic for m in list(everything.queue)]
    claim.close()


def test_the_claim_identity_publishes_nothing_but_claims_on_the_claim_listener(
    idfleet: IdentityFleet,
) -> None:
    operator = idfleet.client("operator")
    seen = operator.collect(f"{PREFIX}/#")
    claim = idfleet.client("claim", claim=True)
    forbidden = _forbidden_writes("clb-a")
    assert _accepted(_publish_all(claim, forbidden)) == {}
    marker = claim_request(_csr("clb-m"), "ebc1.unknown")
    sent = _publish_all(claim, [(enroll_topic(PREFIX, "clb-m", "claim"), marker)])
    assert _accepted(sent) == sent, sent
    leaked = set(_until(seen, json.loads(marker)["id"])) & set(forbidden)
    assert leaked == set(), leaked
    claim.close()
    operator.close()


def test_the_claim_certificate_has_no_right_on_the_device_listener(
    idfleet: IdentityFleet,
) -> None:
    """Same CA, so it connects there; but it reads nothing (not a device called ``claim``'s
    commands, not a group's) and publishes nothing, a claim included."""
    operator = idfleet.client("operator")
    seen = operator.collect(f"{PREFIX}/#")
    claim = idfleet.client("claim")  # the device listener: client id = CN = claim
    got = claim.collect(f"{PREFIX}/#")
    forbidden = [*_forbidden_writes("clc-a"), enroll_topic(PREFIX, "clc-a", "claim")]
    assert _accepted(_publish_all(claim, forbidden)) == {}
    marker = uuid.uuid4().hex
    operator.publish(f"{PREFIX}/clc-m/cmd/marker", {"id": marker})
    leaked = set(_until(seen, marker)) & set(forbidden)
    assert leaked == set(), leaked
    operator.close()
    _send_the_cloud_and_device_traffic(idfleet, "clc-a")
    _flush(claim)
    assert got.empty(), [m.topic for m in list(got.queue)]
    claim.close()


@pytest.mark.parametrize("name", ["cld-a", "operator"])
def test_no_other_certificate_has_any_right_on_the_claim_listener(
    idfleet: IdentityFleet, name: str
) -> None:
    """A device's certificate (or a cloud identity's) on the claim listener cannot act as the
    claim identity: its claim reaches no service (the token stays unspent), it speaks for no
    device, and it reads nothing there, its own commands included."""
    intruder = idfleet.client(name, claim=True)
    got = intruder.collect(f"{PREFIX}/#")
    device = f"{name}-x"
    token = idfleet.ids.create_claims([device], ttl_s=600)[device]
    request = claim_request(_csr(device), token)
    claim = (enroll_topic(PREFIX, device, "claim"), request)
    assert _accepted(_publish_all(intruder, [claim, *_device_topics(name)])) == {}
    _send_the_cloud_and_device_traffic(idfleet, "cld-a")
    _flush(intruder)
    assert got.empty(), [m.topic for m in list(got.queue)]
    intruder.close()
    # The token was never spent: the claim identity's copy of the request gets the certificate.
    answer = idfleet.ask_claim(device, request)
    assert answer["ok"] is True, answer


def _the_three(fleet: IdentityFleet) -> list[TlsClient]:
    """The claim certificate on each listener, and a device's on the claim listener."""
    return [fleet.client("claim", claim=True), fleet.client("claim"), fleet.client("cle-a", True)]


def _confined(clients: list[TlsClient]) -> None:
    claim, on_device, device = clients
    asking = enroll_topic(PREFIX, "cle-m", "claim")
    granted = _publish_all(claim, [(asking, claim_request(_csr("cle-m"), "ebc1.unknown"))])
    assert _accepted(granted) == granted, granted
    for client, topics in (
        (claim, _device_topics("claim")),
        (on_device, [asking, *_device_topics("claim")]),
        (device, [asking, *_device_topics("cle-a")]),
    ):
        accepted = _accepted(_publish_all(client, topics))
        assert accepted == {}, accepted


def test_each_listeners_acl_holds_across_a_crl_reload(idfleet: IdentityFleet) -> None:
    """A CRL change SIGHUPs the broker (``fleet revoke``, the service's CRL refresh), which
    reads its configuration again, each listener's ACL included: for the connections made
    before the reload and after it, the claim certificate claims on the claim listener only,
    and a device's certificate has no right there."""
    assert idfleet.broker.process is not None
    broker = ("127.0.0.1", idfleet.broker.port)
    first = _the_three(idfleet)
    try:
        _confined(first)
        _reloaded(
            idfleet.ids, idfleet.ca, idfleet.ca.paths.crl, idfleet.broker.process.pid, broker, 30
        )
        _confined(first)  # connected before it: the broker applies the reloaded ACLs to them
    finally:
        for client in first:
            client.close()
    again = _the_three(idfleet)
    try:
        _confined(again)
    finally:
        for client in again:
            client.close()
