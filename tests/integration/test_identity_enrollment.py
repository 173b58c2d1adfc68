"""Per-device identity with a real Mosquitto over mTLS and real agents (issue 20): enrollment by
claim, refusals, the ACL by certificate, revocation, an expired certificate."""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import cert_pem, new_key, write_private
from cloud_sync.revocation import revoke_device
from edge_agent.identity import KeyMaker
from tests.support.agent import wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idfleet")).start()
    yield fleet
    fleet.stop()


def _agent(agent_factory: Any, fleet: IdentityFleet, device: str, tmp: Path, **kw: Any) -> Any:
    token = kw.pop("token", None)
    return agent_factory(
        broker=fleet.broker,
        device=device,
        data_dir=tmp / f"agent-{device}",
        prefix=PREFIX,
        args=fleet.agent_args(token),
        **kw,
    )


def _ping(operator: Any, device: str, timeout: float = 20.0) -> dict[str, Any]:
    """A device answers only into its own replies tree (the ACL)."""
    operator.reply_topic = f"{PREFIX}/{device}/replies/operator"
    operator.collect(operator.reply_topic)
    return dict(operator.request(f"{PREFIX}/{device}/cmd/ping", {}, timeout=timeout))


def _until_marker(
    q: queue.Queue[Any], marker: str | None = None, timeout: float = 30.0
) -> list[Any]:
    """The messages of ``q`` up to and including the first on ``marker`` (default: one whose
    topic ends with ``/marker``), waiting for it rather than for a fixed time."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        msg = q.get(timeout=max(0.01, deadline - time.monotonic()))
        got.append(msg)
        if msg.topic == marker or (marker is None and msg.topic.endswith("/marker")):
            return got


def _key(path: Path | None = None) -> Any:
    key = new_key()
    if path is not None:
        write_private(path, key)
    return key


def _csr(cn: str) -> bytes:
    return KeyMaker().csr(_key(), cn)


def test_a_device_enrolls_by_claim_and_serves_over_mtls(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    token = idfleet.ids.create_claims(["enr-a"], ttl_s=600)["enr-a"]
    agent = _agent(agent_factory, idfleet, "enr-a", tmp_path, token=token)
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "enr-a")
    assert _ping(operator, "enr-a")["ok"] is True
    key = agent.data_dir / "identity" / "device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    record = idfleet.ids.device("enr-a")
    assert record is not None and record.current is not None and not record.revoked
    assert b"PRIVATE" not in agent.output().encode()
    # The store keeps the token's hash, never the token.
    stored = b"".join(p.read_bytes() for p in (idfleet.root / "store").rglob("*.json"))
    assert token.encode() not in stored
    operator.close()


def test_reuse_another_id_and_another_subject_are_refused_and_counted(
    idfleet: IdentityFleet,
) -> None:
    tokens = idfleet.ids.create_claims(["ref-a", "ref-b", "ref-c"], ttl_s=600)
    before = dict(idfleet.service.refusals)
    first = idfleet.ask_claim("ref-a", claim_request(_csr("ref-a"), tokens["ref-a"]))
    assert first["ok"] is True and "BEGIN CERTIFICATE" in first["certificate"]
    again = idfleet.ask_claim("ref-a", claim_request(_csr("ref-a"), tokens["ref-a"]))
    assert (again["ok"], again["reason"]) == (False, "token_reused")
    other = idfleet.ask_claim("ref-a", claim_request(_csr("ref-a"), tokens["ref-b"]))
    assert (other["ok"], other["reason"]) == (False, "wrong_device")
    subject = idfleet.ask_claim("ref-c", claim_request(_csr("ref-a"), tokens["ref-c"]))
    assert (subject["ok"], subject["reason"]) == (False, "bad_csr")
    # A CSR for another subject did not burn ref-c's token.
    good = idfleet.ask_claim("ref-c", claim_request(_csr("ref-c"), tokens["ref-c"]))
    assert good["ok"] is True
    after = idfleet.service.refusals
    for reason in ("token_reused", "wrong_device", "bad_csr"):
        assert after[reason] == before.get(reason, 0) + 1


def test_the_claim_identity_reaches_only_the_enrollment_topics(idfleet: IdentityFleet) -> None:
    operator = idfleet.client("operator")
    everything = operator.collect(f"{PREFIX}/cl-a/#")  # a new device: nothing retained there
    claim = idfleet.client("claim", claim=True)
    for topic in (f"{PREFIX}/cl-a/status", f"{PREFIX}/cl-a/cmd/x", f"{PREFIX}/cl-a/telemetry"):
        claim.publish(topic, {"forged": True})  # each acknowledged by the broker before the next
    # After the claim's acknowledged publishes, the operator's own: what the broker let by of
    # the claim's would reach the subscriber before it.
    operator.publish(f"{PREFIX}/cl-a/replies/marker", {"marker": True})
    assert [m.topic for m in _until_marker(everything)] == [f"{PREFIX}/cl-a/replies/marker"]
    claim.close()
    operator.close()


def test_a_device_cannot_speak_for_another_by_certificate(idfleet: IdentityFleet) -> None:
    operator = idfleet.client("operator")
    queues = [operator.collect(f"{PREFIX}/{d}/#") for d in ("acl-a", "acl-b", "enroll/acl-b")]
    a = idfleet.client("acl-a")
    theirs = a.collect(f"{PREFIX}/acl-b/#")
    own = a.collect(f"{PREFIX}/acl-a/cmd/marker")
    forged = {"schema_version": 1, "generation": 10**6}
    for topic in (
        f"{PREFIX}/acl-b/status",
        f"{PREFIX}/acl-b/telemetry",
        f"{PREFIX}/acl-b/replies/x",
        f"{PREFIX}/acl-a/desired",
        f"{PREFIX}/acl-b/cmd/deploy",
        f"{PREFIX}/enroll/acl-b/renew",
    ):
        a.publish(topic, forged)
    a.publish(f"{PREFIX}/acl-a/telemetry", {"own": True})
    operator.publish(f"{PREFIX}/acl-b/cmd/ping", {"id": "p"})
    # Every publish above was acknowledged before the next was sent: once the operator's own
    # ping has arrived, whatever the broker let by of a's has arrived before it.
    seen = [m.topic for m in _until_marker(queues[1], f"{PREFIX}/acl-b/cmd/ping")]
    seen += [q.get().topic for q in (queues[0], queues[2]) for _ in range(q.qsize())]
    assert sorted(seen) == [f"{PREFIX}/acl-a/telemetry", f"{PREFIX}/acl-b/cmd/ping"]
    # A marker for a, on a topic of its own, sent once the ping was acknowledged: the broker
    # delivers to a in order, so whatever it let a read of b's (the forgeries, the ping) has
    # arrived before the marker does. Checked before that, nothing could merely be late.
    operator.publish(f"{PREFIX}/acl-a/cmd/marker", {"marker": True})
    assert [m.topic for m in _until_marker(own)] == [f"{PREFIX}/acl-a/cmd/marker"]
    assert theirs.empty()
    a.close()
    operator.close()


def test_revocation_drops_the_device_within_seconds_and_keeps_the_others(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    tokens = idfleet.ids.create_claims(["rev-a", "rev-b"], ttl_s=600)
    a = _agent(agent_factory, idfleet, "rev-a", tmp_path, token=tokens["rev-a"])
    b = _agent(agent_factory, idfleet, "rev-b", tmp_path, token=tokens["rev-b"])
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "rev-a")
    wait_online(operator, PREFIX, "rev-b")
    assert idfleet.broker.process is not None
    started = time.monotonic()
    _, kicked = revoke_device(
        idfleet.ids,
        idfleet.ca,
        "rev-a",
        idfleet.ca.paths.crl,
        idfleet.broker.process.pid,
        ("127.0.0.1", idfleet.broker.port),
    )
    took = time.monotonic() - started
    assert kicked and took < 5, took
    with pytest.raises(AssertionError, match="no reply"):
        _ping(operator, "rev-a", timeout=4)
    assert _ping(operator, "rev-b")["ok"] is True
    # It keeps trying, and says why it cannot get in.
    deadline = time.monotonic() + 20
    while "may be revoked" not in a.output():
        assert time.monotonic() < deadline, a.output()[-2000:]
        time.sleep(0.2)
    assert b.output().count("connected to") == 1, b.output()  # never dropped
    # Its renewal is refused too.
    reply = idfleet.service.handle("rev-a", "renew", claim_request(_csr("rev-a"), None))
    assert (reply.ok, reply.reason) == (False, "revoked")
    operator.close()


def test_an_expired_certificate_says_why_and_needs_a_new_token(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    token = idfleet.ids.create_claims(["exp-a"], ttl_s=600)["exp-a"]
    data = tmp_path / "agent-exp-a"
    ident = data / "identity"
    ident.mkdir(parents=True)
    key = _key(ident / "device.key")
    cert = idfleet.ca._issue("exp-a", key.public_key(), 1.5 / 86400, [])
    (ident / "device.crt").write_bytes(cert_pem(cert))
    idfleet.ids.consume_claim(token, "exp-a")  # it enrolled with it once already
    time.sleep(2.0)
    agent = _agent(agent_factory, idfleet, "exp-a", tmp_path)
    assert agent.process.wait(30) == 3
    assert "expired" in agent.output() and "new claim token" in agent.output()
    status = json.loads((ident / "status.json").read_text())
    assert status["state"] == "expired"
    old = _agent(agent_factory, idfleet, "exp-a", tmp_path, token=token)
    assert old.process.wait(30) == 3
    assert "token_reused" in old.output()
    fresh = idfleet.ids.create_claims(["exp-a"], ttl_s=600)["exp-a"]
    _agent(agent_factory, idfleet, "exp-a", tmp_path, token=fresh)
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "exp-a")
    operator.close()
    assert os.stat(ident / "device.key").st_mode & 0o777 == 0o600
