"""Issue 20's acceptance, item by item, where no other test proved it through the real process:
a real Mosquitto with mTLS and the generated ACL, the real enrollment service, real agents and
the real ``edgebento fleet ...`` commands.

- item 1: ``fleet ca init`` / ``ca issue`` never print a key, write them 0600, and the root key
  is not needed once it has gone offline;
- item 2: a batch claim from ``fleet claim --batch``, spent once per listed device, one device
  enrolling from ``--enroll-file``; expired and unknown tokens refused and counted; nobody but
  the claim identity reaches a device's claim topic or forges its enrollment answer;
- item 3: both listeners require a certificate of the fleet; a device cannot read another's
  requests (checked against a message it must get); the enrollment service's identity writes
  answers and nothing else;
- item 6: fleet status shows a revoked device's certificate as revoked;
- item 5: what Mosquitto 2.0.11 does on a CRL reload (measured: the live session stays), and
  ``fleet revoke --cert`` for the shared claim certificate;
- ``fleet enroll-service`` exits, saying why, on a subscription its broker refuses.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import enroll_topic
from cloud_sync.fleet_ca import new_key, tls_context
from cloud_sync.revocation import _connect, _reloaded, kick_session
from edge_agent.identity import KeyMaker
from modelpack.errors import BrokerError
from tests.integration.test_cloud_subscribed import RefusingMosquitto
from tests.support.agent import wait_online
from tests.support.cli_run import run_cli
from tests.support.identity_cli import as_operator, fleet_cli
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idaccept")).start()
    yield fleet
    fleet.stop()


def _csr(device: str) -> bytes:
    return KeyMaker().csr(new_key(), device)


def _ping(operator: Any, device: str, timeout: float = 20.0) -> dict[str, Any]:
    operator.reply_topic = f"{PREFIX}/{device}/replies/operator"
    operator.collect(operator.reply_topic)
    return dict(operator.request(f"{PREFIX}/{device}/cmd/ping", {}, timeout=timeout))


def test_the_ca_commands_print_no_key_write_0600_and_need_no_root_once_offline(
    tmp_path: Path,
) -> None:
    ca, ids = tmp_path / "ca", tmp_path / "ids"
    fleet_cli("fleet", "ca", "init", "--out", ca)
    for key in (ca / "offline" / "root.key", ca / "issuing" / "ca.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    # The root key goes offline: issuing identities and signing claims use the intermediate.
    shutil.move(ca / "offline", tmp_path / "usb-stick")
    fleet_cli("fleet", "ca", "issue", "--out", ca, "--name", "claim", "--name", "sync", "--to", ids)
    assert {p.name: p.stat().st_mode & 0o777 for p in ids.glob("*.key")} == {
        "claim.key": 0o600,
        "sync.key": 0o600,
    }
    claims = json.loads(
        fleet_cli("fleet", "claim", "--devices", "cam-1", "--ca", ca, "--store", tmp_path / "s")
    )
    assert set(claims["claims"]) == {"cam-1"}


def test_a_client_without_a_certificate_of_the_fleet_is_refused_on_both_listeners(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    """``require_certificate true`` on the device and the claim listener: no certificate, or one
    of another CA naming a cloud identity (``operator``), does not get in; the fleet's does."""
    from cloud_sync.fleet_ca import FleetCA, init_ca

    init_ca(tmp_path / "other-ca")
    forged = FleetCA.load(tmp_path / "other-ca").issue_identity("operator", tmp_path / "forged")
    bundle = idfleet.ca.paths.bundle
    refused = {"no certificate": tls_context(bundle, None, None)}
    refused["another CA's operator"] = tls_context(bundle, *forged)
    ports = {"device": idfleet.broker.port, "claim": idfleet.broker.claim_port}
    for listener, port in ports.items():
        for what, context in refused.items():
            try:
                got_in = _connect(context, f"x-{listener}", "127.0.0.1", port, 10)
            except BrokerError:  # the broker reset the handshake: refused as well
                got_in = False
            assert not got_in, (listener, what)
    # The fleet's own claim certificate does (the control: the listeners are up and answer).
    claim = tls_context(bundle, *idfleet.certs["claim"])
    assert _connect(claim, "claim-control", "127.0.0.1", idfleet.broker.claim_port, 10)


def test_a_batch_claim_enrolls_each_listed_device_once_one_from_a_token_file(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    store = idfleet.root / "store"
    out = fleet_cli(
        "fleet", "claim", "--batch", "--devices", "bat-a,bat-b", "--ttl", "10m",
        "--ca", idfleet.root / "ca", "--store", store,
    )  # fmt: skip
    token = json.loads(out)["claims"]["bat-a,bat-b"]
    first = idfleet.ask_claim("bat-a", claim_request(_csr("bat-a"), token))
    assert first["ok"] is True
    again = idfleet.ask_claim("bat-a", claim_request(_csr("bat-a"), token))
    assert (again["ok"], again["reason"]) == (False, "token_reused")
    stranger = idfleet.ask_claim("bat-c", claim_request(_csr("bat-c"), token))
    assert (stranger["ok"], stranger["reason"]) == (False, "wrong_device")
    # bat-b, a real agent, reads the same token from a file (not on its command line).
    token_file = tmp_path / "bat-b.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    claim_cert, claim_key = idfleet.certs["claim"]
    agent = agent_factory(
        broker=idfleet.broker,
        device="bat-b",
        data_dir=tmp_path / "agent-bat-b",
        prefix=PREFIX,
        args=(
            "--ca-file", str(idfleet.ca.paths.bundle), "--enroll-file", str(token_file),
            "--claim-broker", idfleet.broker.claim_url,
            "--claim-cert", str(claim_cert), "--claim-key", str(claim_key),
        ),
    )  # fmt: skip
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "bat-b")
    assert _ping(operator, "bat-b")["ok"] is True
    record = idfleet.ids.device("bat-b")
    assert record is not None and record.certificates[-1].via == "claim"
    assert token not in agent.output()
    operator.close()


def test_an_expired_or_unknown_token_is_refused_and_counted(idfleet: IdentityFleet) -> None:
    token = idfleet.ids.create_claims(["exp-t"], ttl_s=0.5)["exp-t"]
    expired_by = time.time() + 0.5  # at or after the claim's expires_at (wall clock)
    before = dict(idfleet.service.refusals)
    while time.time() <= expired_by:
        time.sleep(0.05)
    late = idfleet.ask_claim("exp-t", claim_request(_csr("exp-t"), token))
    assert (late["ok"], late["reason"]) == (False, "expired_token")
    guessed = idfleet.ask_claim("exp-t", claim_request(_csr("exp-t"), "ebc1." + "A" * 43))
    assert (guessed["ok"], guessed["reason"]) == (False, "unknown_token")
    after = idfleet.service.refusals
    for reason in ("expired_token", "unknown_token"):
        assert after[reason] == before.get(reason, 0) + 1, reason
    assert idfleet.ids.device("exp-t") is None  # no certificate was issued


def test_a_device_cannot_forge_enrollment_messages_nor_read_anothers_requests(
    idfleet: IdentityFleet,
) -> None:
    operator = idfleet.client("operator")
    enrolling = operator.collect(f"{PREFIX}/enroll/frg-b/#")
    a = idfleet.client("frg-a")
    theirs = a.collect(f"{PREFIX}/frg-b/#")
    mine = a.collect(f"{PREFIX}/frg-a/cmd/#")
    # frg-a claims for frg-b, answers frg-b's enrollment with a certificate of its own choosing,
    # and says frg-b rotated: none of it is its to publish.
    forged_claim = claim_request(_csr("frg-b"), "ebc1.forged")
    a.publish(enroll_topic(PREFIX, "frg-b", "claim"), forged_claim)
    a.publish(enroll_topic(PREFIX, "frg-b", "response"), {"id": "x", "ok": True})
    a.publish(enroll_topic(PREFIX, "frg-b", "rotated"), {"schema_version": 1, "id": "y"})
    # What frg-b is sent, each by the identity whose right it is: a command and a request (the
    # operator), a desired state (the controller), an acknowledgement (the ingestion).
    for topic in ("cmd/ping", "infer"):
        operator.publish(f"{PREFIX}/frg-b/{topic}", {"id": topic})
    for name, topic in (("controller", "desired"), ("sync", "telemetry/ack")):
        cloud = idfleet.client(name)
        cloud.publish(f"{PREFIX}/frg-b/{topic}", {"id": topic})
        cloud.close()
    # Then something frg-a must get: the broker delivers to one client in order, so once it
    # arrived, whatever the ACL let by of frg-b's would have arrived before it.
    operator.publish(f"{PREFIX}/frg-a/cmd/marker", {"id": "marker"})
    assert json.loads(mine.get(timeout=30).payload) == {"id": "marker"}
    assert theirs.empty(), [m.topic for m in list(theirs.queue)]
    # On frg-b's enrollment topics the first message is the claim identity's, sent after
    # frg-a's acknowledged ones: none of those got by.
    claim = idfleet.client("claim", claim=True)
    claim.publish(enroll_topic(PREFIX, "frg-b", "claim"), {"id": "after"})
    claim.close()
    got = enrolling.get(timeout=30)
    assert json.loads(got.payload) == {"id": "after"}, (got.topic, got.payload)
    a.close()
    operator.close()


def test_only_the_claim_identity_claims_a_devices_certificate(idfleet: IdentityFleet) -> None:
    """A valid claim sent by any other identity, cloud or device, reaches no service: the token
    stays unspent, and the claim identity's copy of it gets the certificate."""
    token = idfleet.ids.create_claims(["onl-b"], ttl_s=600)["onl-b"]
    csr = _csr("onl-b")
    operator = idfleet.client("operator")
    answers = operator.collect(enroll_topic(PREFIX, "onl-b", "response"))
    operator.publish(enroll_topic(PREFIX, "onl-b", "claim"), claim_request(csr, token))
    for name in ("controller", "sync", "onl-a"):
        other = idfleet.client(name)
        other.publish(enroll_topic(PREFIX, "onl-b", "claim"), claim_request(csr, token))
        other.close()
    answer = idfleet.ask_claim("onl-b", claim_request(csr, token))
    assert answer["ok"] is True, answer
    first = json.loads(answers.get(timeout=30).payload)
    assert first["id"] == answer["id"], first  # nothing was answered before it
    operator.close()


def test_the_enrollment_service_identity_writes_answers_and_nothing_else(
    idfleet: IdentityFleet,
) -> None:
    """``enroll`` may answer enrollments; it may not speak for a device, steer one, command one
    or acknowledge its telemetry. (Its one connection is the service's: stopped meanwhile.)"""
    operator = idfleet.client("operator")
    watched = operator.collect(f"{PREFIX}/enr-x/#")
    answers = operator.collect(enroll_topic(PREFIX, "enr-x", "response"))
    idfleet.service.stop()
    try:
        enroll = idfleet.client("enroll")
        for topic in ("status", "telemetry", "replies/x", "desired", "cmd/ping", "telemetry/ack"):
            enroll.publish(f"{PREFIX}/enr-x/{topic}", {"id": "forged"})
        enroll.publish(enroll_topic(PREFIX, "enr-x", "response"), {"id": "its-own"})
        enroll.close()
    finally:
        idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        idfleet.service.wait_serving(30)
    operator.publish(f"{PREFIX}/enr-x/cmd/marker", {"id": "marker"})
    seen = [watched.get(timeout=30).topic]
    while not seen[-1].endswith("/marker"):
        seen.append(watched.get(timeout=30).topic)
    assert seen == [f"{PREFIX}/enr-x/cmd/marker"], seen
    # What it may do went through, on the same connection: nothing above was refused for that.
    assert json.loads(answers.get(timeout=30).payload) == {"id": "its-own"}
    operator.close()


def test_a_crl_reload_keeps_a_live_session_so_revocation_takes_it_over(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    """Measured on Mosquitto 2.0.11 (docs/fleet-identity.md, Revocation): after a SIGHUP the
    broker refuses the revoked certificate, but the device's open session keeps working; the
    takeover of ``fleet revoke`` is what drops it."""
    token = idfleet.ids.create_claims(["crl-a"], ttl_s=600)["crl-a"]
    agent = agent_factory(
        broker=idfleet.broker,
        device="crl-a",
        data_dir=tmp_path / "agent-crl-a",
        prefix=PREFIX,
        args=idfleet.agent_args(token),
    )
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "crl-a")
    assert idfleet.broker.process is not None
    broker = ("127.0.0.1", idfleet.broker.port)
    idfleet.ids.revoke("crl-a")
    # The CRL written and the broker running on it (a probe revoked with it is refused).
    _reloaded(idfleet.ids, idfleet.ca, idfleet.ca.paths.crl, idfleet.broker.process.pid, broker, 10)
    ident = agent.data_dir / "identity"
    revoked = tls_context(idfleet.ca.paths.bundle, ident / "device.crt", ident / "device.key")
    assert not _connect(revoked, "crl-a", *broker, 10)  # the certificate is refused now ...
    assert _ping(operator, "crl-a")["ok"] is True  # ... but its live session still works
    assert kick_session(idfleet.ca, "crl-a", *broker, prefix=PREFIX)
    with pytest.raises(AssertionError, match="no reply"):
        _ping(operator, "crl-a", timeout=4)
    deadline = time.monotonic() + 20
    while "may be revoked" not in agent.output():
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.2)
    operator.close()
    # What fleet status shows of it (item 6): the store's record says revoked, in red.
    url, store = idfleet.broker.url, idfleet.root / "store"
    checked = ("--store", store, "--ca", idfleet.root / "ca")  # the records, checked
    status = fleet_cli(
        "fleet", "status", "--broker", url, *checked, "--json", env=as_operator(idfleet)
    )
    device = json.loads(status)["devices"]["crl-a"]
    assert device["state"] == "offline" and device["identity"]["state"] == "revoked", device
    table = fleet_cli("fleet", "status", "--broker", url, *checked, env=as_operator(idfleet))
    assert "revoked" in next(ln for ln in table.splitlines() if ln.startswith("crl-a")), table


def test_a_sighup_the_broker_lost_is_sent_again_until_the_crl_takes(
    idfleet: IdentityFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto clears its reload flag after reloading, so a SIGHUP that comes while it
    reloads is lost (one CI run: a CRL never taken, the revocation waited in vain). Here the
    first SIGHUP is lost outright: the wait for the probe's refusal signals the broker again."""
    from cloud_sync import crl_publish, revocation

    assert idfleet.broker.process is not None
    hang_up, calls = crl_publish.hang_up, []

    def lossy(broker_pid: Any) -> None:
        calls.append(broker_pid)
        if len(calls) > 1:  # the first is lost
            hang_up(broker_pid)

    # The writer's SIGHUP (publish_crl) is the first; the wait's are revocation's.
    monkeypatch.setattr(crl_publish, "hang_up", lossy)
    monkeypatch.setattr(revocation, "_hang_up", lossy)
    broker = ("127.0.0.1", idfleet.broker.port)
    _reloaded(idfleet.ids, idfleet.ca, idfleet.ca.paths.crl, idfleet.broker.process.pid, broker, 10)
    assert len(calls) >= 2


def test_fleet_revoke_cert_shuts_the_claim_certificate_out_and_a_new_one_works(
    idfleet: IdentityFleet,
) -> None:
    """A leaked claim certificate (the one a whole batch shares) is revoked by its file; devices
    then enroll with a new one. Last in this module: it retires the fleet's claim identity."""
    assert idfleet.broker.process is not None
    broker = ("127.0.0.1", idfleet.broker.port)
    claim_cert, _ = idfleet.certs["claim"]
    out = fleet_cli(
        "fleet", "revoke", "--cert", claim_cert, "--store", idfleet.root / "store",
        "--ca", idfleet.root / "ca", "--crl-file", idfleet.ca.paths.crl,
        "--broker-pid", str(idfleet.broker.process.pid), "--broker", idfleet.broker.url,
    )  # fmt: skip
    result = json.loads(out)
    assert (result["cn"], result["revoked"]) == ("claim", True)
    claim = tls_context(idfleet.ca.paths.bundle, *idfleet.certs["claim"])
    assert not _connect(claim, "claim-x", "127.0.0.1", idfleet.broker.claim_port, 10)
    # The enrollment service's own CRL refresh keeps it listed: it is in the store's index.
    from cloud_sync.fleet_ca import load_cert

    serial = load_cert(claim_cert.read_bytes()).serial_number
    assert serial in {s for s, _ in idfleet.ids.revoked_serials()}
    idfleet.publish_crl()
    _reloaded(idfleet.ids, idfleet.ca, idfleet.ca.paths.crl, idfleet.broker.process.pid, broker, 10)
    assert not _connect(claim, "claim-x", "127.0.0.1", idfleet.broker.claim_port, 10)
    idfleet.certs["claim"] = idfleet.ca.issue_identity("claim", idfleet.root / "identities")
    token = idfleet.ids.create_claims(["rvc-a"], ttl_s=600)["rvc-a"]
    answer = idfleet.ask_claim("rvc-a", claim_request(_csr("rvc-a"), token))
    assert answer["ok"] is True
    # A certificate of another CA is refused, and nothing is written.
    stranger = idfleet.root / "stranger"
    run_cli("fleet", "ca", "init", "--out", str(stranger))
    refused = run_cli(
        "fleet", "revoke", "--cert", str(stranger / "issuing" / "ca.crt"),
        "--store", str(idfleet.root / "store"), "--ca", str(idfleet.root / "ca"),
        "--crl-file", str(idfleet.ca.paths.crl),
    )  # fmt: skip
    assert refused.returncode != 0 and "not issued by this fleet CA" in refused.stderr


def test_the_enroll_service_process_exits_on_a_refused_subscription(tmp_path: Path) -> None:
    """``edgebento fleet enroll-service`` connects in the background; a broker that refuses its
    subscriptions must end it, said, not leave it running deaf to every claim."""
    broker = RefusingMosquitto(workdir=tmp_path / "refusing", prefix="p").start()
    try:
        ca, ids = tmp_path / "ca", tmp_path / "ids"
        fleet_cli("fleet", "ca", "init", "--out", ca)
        fleet_cli("fleet", "ca", "issue", "--out", ca, "--name", "enroll", "--to", ids)
        done = run_cli(
            "fleet", "enroll-service", "--broker", broker.url, "--prefix", "p",
            "--ca", str(ca), "--cert", str(ids / "enroll.crt"), "--key", str(ids / "enroll.key"),
            "--store", str(tmp_path / "store"), timeout=120,
        )  # fmt: skip
    finally:
        broker.stop()
    assert done.returncode != 0
    assert "refused" in done.stderr and "p/enroll/+/claim" in done.stderr, done.stderr[-2000:]
