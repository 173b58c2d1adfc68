"""Issue 20 under attack (an adversarial review): a revoked device and a holder of the shared
claim certificate, against the real enrollment service over Mosquitto with mTLS and the
generated ACL. (A claim certificate taking a device's client id on the claim listener is a
documented limit of Mosquitto 2.0.11: tests/integration/test_identity_status_report.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import RateLimit, enroll_topic
from cloud_sync.fleet_ca import cert_pem, new_key, tls_context, write_private
from cloud_sync.identity_store import token_hash
from cloud_sync.revocation import _connect, _ephemeral, publish_crl, revoke_device
from edge_agent.identity import KeyMaker
from tests.support.agent import wait_for, wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idreview")).start()
    yield fleet
    fleet.stop()


def _csr(cn: str) -> bytes:
    return KeyMaker().csr(new_key(), cn)


def test_a_claim_issued_before_the_revocation_does_not_bring_the_device_back(
    idfleet: IdentityFleet,
) -> None:
    # The operator made two tokens for one device (a lost label, a second try); the device
    # enrolled with one and was then revoked (stolen). The other token must not undo that.
    first = idfleet.ids.create_claims(["rv-a"], ttl_s=600)["rv-a"]
    spare = idfleet.ids.create_claims(["rv-a"], ttl_s=600)["rv-a"]
    assert idfleet.ask_claim("rv-a", claim_request(_csr("rv-a"), first))["ok"] is True
    idfleet.ids.revoke("rv-a")
    again = idfleet.ask_claim("rv-a", claim_request(_csr("rv-a"), spare))
    assert (again["ok"], again.get("reason")) == (False, "revoked")
    record = idfleet.ids.device("rv-a")
    assert record is not None and record.revoked
    # An operator who means it issues a new claim after the revocation.
    fresh = idfleet.ids.create_claims(["rv-a"], ttl_s=600)["rv-a"]
    assert idfleet.ask_claim("rv-a", claim_request(_csr("rv-a"), fresh))["ok"] is True


def test_junk_claims_for_a_device_do_not_lock_its_real_claim_out(idfleet: IdentityFleet) -> None:
    # Any holder of the shared claim certificate can publish on every device's claim topic;
    # without the device's token it must not be able to spend the device's rate limit.
    saved = idfleet.service.limit
    idfleet.service.limit = RateLimit(rate=1000, burst=1000, per_device_s=60.0)
    try:
        token = idfleet.ids.create_claims(["dos-a"], ttl_s=600)["dos-a"]
        junk = idfleet.ask_claim("dos-a", claim_request(_csr("dos-a"), "ebc1.guessed"))
        assert (junk["ok"], junk.get("reason")) == (False, "unknown_token")
        real = idfleet.ask_claim("dos-a", claim_request(_csr("dos-a"), token))
        assert real["ok"] is True, real
    finally:
        idfleet.service.limit = saved


def test_a_writer_to_the_store_cannot_forge_a_claim(idfleet: IdentityFleet) -> None:
    # Whoever can write the bucket (and not the CA's key) plants the hash of a token of its own,
    # for a device it wants to speak for, and asks the service to sign a certificate.
    victim = "forge-a"
    token = "ebc1.planted-by-the-store-writer"
    doc = {"devices": [victim], "batch": False, "expires_at": time.time() + 600}
    idfleet.ids.store.create(
        f"fleet/identity/claims/{token_hash(token)}.json", json.dumps(doc).encode()
    )
    forged = idfleet.ask_claim(victim, claim_request(_csr(victim), token))
    assert (forged["ok"], forged.get("reason")) == (False, "forged_claim"), forged
    assert "certificate" not in forged and idfleet.ids.device(victim) is None
    # Copying a real claim's signature onto other devices does not help either.
    real = idfleet.ids.create_claims([victim], ttl_s=600)[victim]
    key = f"fleet/identity/claims/{token_hash(real)}.json"
    signed = json.loads(idfleet.ids.store.get_bytes(key))
    widened = {**signed, "devices": [victim, "forge-b"], "batch": True}
    idfleet.ids.store.create(
        f"fleet/identity/claims/{token_hash(token + '2')}.json", json.dumps(widened).encode()
    )
    other = idfleet.ask_claim("forge-b", claim_request(_csr("forge-b"), token + "2"))
    assert (other["ok"], other.get("reason")) == (False, "forged_claim"), other
    assert idfleet.ask_claim(victim, claim_request(_csr(victim), real))["ok"] is True


def test_a_weak_key_is_not_certified_and_does_not_spend_the_token(idfleet: IdentityFleet) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    token = idfleet.ids.create_claims(["weak-a"], ttl_s=600)["weak-a"]
    for key in (rsa.generate_private_key(65537, 1024), ec.generate_private_key(ec.SECP192R1())):
        weak = idfleet.ask_claim("weak-a", claim_request(KeyMaker().csr(key, "weak-a"), token))
        assert (weak["ok"], weak.get("reason")) == (False, "bad_csr"), weak
        assert "key" in weak["error"]
    good = idfleet.ask_claim("weak-a", claim_request(_csr("weak-a"), token))
    assert good["ok"] is True


def test_a_busy_enrollment_service_does_not_stop_the_device_for_good(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    # A flood of claims from whoever holds the claim certificate empties the service's bucket:
    # a device told "rate_limited" must ask again, not exit as refused (exit 3 keeps it down).
    saved = idfleet.service.limit
    closed = RateLimit(rate=1e-9, burst=1, per_device_s=0.0)
    closed._tokens = 0.0  # what the flood leaves
    idfleet.service.limit = closed
    before = idfleet.service.refusals["rate_limited"]
    try:
        token = idfleet.ids.create_claims(["busy-a"], ttl_s=600)["busy-a"]
        agent = agent_factory(
            broker=idfleet.broker,
            device="busy-a",
            data_dir=tmp_path / "agent-busy-a",
            prefix=PREFIX,
            args=idfleet.agent_args(token),
        )
        deadline = time.monotonic() + 60
        while idfleet.service.refusals["rate_limited"] == before:
            assert time.monotonic() < deadline and agent.process.poll() is None, agent.output()
            time.sleep(0.05)
    finally:
        idfleet.service.limit = saved
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "busy-a")
    operator.close()
    assert "busy" in agent.output()


def test_a_writer_to_the_store_cannot_take_a_revocation_back(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = "unrev-a"
    token = idfleet.ids.create_claims([device], ttl_s=600)[device]
    key = new_key()
    answer = idfleet.ask_claim(device, claim_request(KeyMaker().csr(key, device), token))
    cert_file, key_file = tmp_path / "d.crt", tmp_path / "d.key"
    cert_file.write_text(answer["certificate"])
    write_private(key_file, key)
    assert idfleet.broker.process is not None
    pid, broker = idfleet.broker.process.pid, ("127.0.0.1", idfleet.broker.port)
    revoke_device(idfleet.ids, idfleet.ca, device, idfleet.ca.paths.crl, pid, broker)
    assert not _connects(idfleet, cert_file, key_file)
    # The writer empties the CRL's index and marks the device not revoked; the next CRL the
    # cloud writes (any device's rotation) must still list the revoked certificate.
    store = idfleet.ids.store
    store.put_bytes("fleet/identity/crl.json", json.dumps({"entries": []}).encode())
    record = json.loads(store.get_bytes(f"fleet/identity/devices/{device}.json"))
    record |= {"revoked": False, "revoked_at": None, "retired": []}
    store.put_bytes(f"fleet/identity/devices/{device}.json", json.dumps(record).encode())
    # What the cloud writes next, and a probe certificate revoked in it: once the probe is
    # refused, the broker runs on that CRL.
    probe, probe_serial = _ephemeral(idfleet.ca, "revocation-probe")
    publish_crl(
        idfleet.ca, idfleet.ids, idfleet.ca.paths.crl, pid, extra={probe_serial: time.time() + 120}
    )
    deadline = time.monotonic() + 30
    while _connect(probe, "revocation-probe", *broker, timeout=10):
        assert time.monotonic() < deadline, "the broker did not reload its CRL"
        time.sleep(0.1)
    assert not _connects(idfleet, cert_file, key_file)


def _connects(fleet: IdentityFleet, cert_file: Path, key_file: Path) -> bool:
    """Whether the broker takes a connection with this certificate."""
    ctx = tls_context(fleet.ca.paths.bundle, cert_file, key_file)
    return _connect(ctx, "unrev-probe", "127.0.0.1", fleet.broker.port, timeout=10)


def test_a_wrong_enrollment_answer_does_not_become_the_devices_identity(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    # In place of the enrollment service, an answerer with its identity that certifies some
    # other key for the device (a faulty service, or a hostile one).
    idfleet.service.stop()
    hostile = idfleet.client("enroll")
    try:
        requests = hostile.collect(enroll_topic(PREFIX, "+", "claim"))
        token = idfleet.ids.create_claims(["wrong-a"], ttl_s=600)["wrong-a"]
        data = tmp_path / "agent-wrong-a"
        agent = agent_factory(
            broker=idfleet.broker,
            device="wrong-a",
            data_dir=data,
            prefix=PREFIX,
            args=idfleet.agent_args(token),
        )
        request = wait_for(requests, lambda d: "id" in d, 60)
        other = cert_pem(idfleet.ca.sign_device_csr(_csr("wrong-a"), "wrong-a")).decode()
        answer = {"schema_version": 1, "id": request["id"], "ok": True, "certificate": other}
        hostile.publish(enroll_topic(PREFIX, "wrong-a", "response"), answer)
        assert agent.process.wait(60) == 3, agent.output()[-2000:]
        assert "another key" in agent.output()
        assert not (data / "identity" / "device.crt").exists()
        status = json.loads((data / "identity" / "status.json").read_text())
        assert status["state"] == "refused" and "another key" in status["reason"]
    finally:
        hostile.close()
        idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        idfleet.service.wait_serving(30)


def test_what_a_csr_asks_for_beyond_its_subject_is_not_granted(idfleet: IdentityFleet) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = new_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "greedy-a")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    token = idfleet.ids.create_claims(["greedy-a"], ttl_s=600)["greedy-a"]
    answer = idfleet.ask_claim("greedy-a", claim_request(greedy, token))
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["urn:edgebento:device:greedy-a"]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 89 < life.total_seconds() / 86400 < 91
