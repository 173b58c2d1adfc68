"""The fleet CA, the claim store and the enrollment service's decisions (issue 20), without a
broker: what is signed, what is refused, and that hostile requests never get a certificate."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.enroll import EnrollmentService, RateLimit
from cloud_sync.fleet_ca import DEVICE_URI, FleetCA, init_ca, load_cert, new_key
from cloud_sync.identity_store import ClaimRefused, IdentityStore
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from modelpack.errors import ConfigError


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("ca")
    init_ca(out)
    return FleetCA.load(out)


@pytest.fixture
def ids(tmp_path: Path, ca: FleetCA) -> IdentityStore:
    return IdentityStore(open_store(str(tmp_path / "store")), ca)


def _csr(cn: str) -> bytes:
    return KeyMaker().csr(new_key(), cn)


def _request(csr: bytes, token: str | None = None) -> bytes:
    doc: dict[str, Any] = {"id": "r1", "csr": csr.decode()}
    if token is not None:
        doc["token"] = token
    return json.dumps(doc).encode()


def test_keys_are_0600_and_the_root_only_signs_the_intermediate(ca: FleetCA) -> None:
    for key in (ca.paths.root_key, ca.paths.issuing_key):
        assert key.stat().st_mode & 0o777 == 0o600
    root = load_cert(ca.paths.root_cert.read_bytes())
    assert ca.cert.issuer == root.subject
    with pytest.raises(ConfigError, match="already holds"):
        init_ca(ca.paths.root_cert.parent)


def test_a_device_certificate_names_the_device_twice(ca: FleetCA) -> None:
    from cryptography import x509

    cert = ca.sign_device_csr(_csr("cam-1"), "cam-1", days=90)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [DEVICE_URI + "cam-1"]
    from cryptography.x509.oid import NameOID

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["cam-1"]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 89.9 < life.total_seconds() / 86400 < 90.1
    with pytest.raises(ConfigError, match="not CN=cam-1"):
        ca.sign_device_csr(_csr("cam-2"), "cam-1")


def test_a_claim_is_single_use_bound_and_expires(ids: IdentityStore) -> None:
    tokens = ids.create_claims(["a", "b"], ttl_s=60)
    with pytest.raises(ClaimRefused) as wrong:
        ids.consume_claim(tokens["a"], "b")
    assert wrong.value.reason == "wrong_device"
    ids.consume_claim(tokens["a"], "a")
    with pytest.raises(ClaimRefused) as again:
        ids.consume_claim(tokens["a"], "a")
    assert again.value.reason == "token_reused"
    with pytest.raises(ClaimRefused) as late:
        ids.consume_claim(tokens["b"], "b", now=time.time() + 61)
    assert late.value.reason == "expired_token"
    with pytest.raises(ClaimRefused) as unknown:
        ids.consume_claim("ebc1.nothing", "a")
    assert unknown.value.reason == "unknown_token"
    for reserved in ("sync", "broker", "revocation-probe"):
        with pytest.raises(ConfigError, match="reserved"):
            ids.create_claims([reserved], ttl_s=60)


def test_a_batch_claim_takes_each_listed_device_once(ids: IdentityStore) -> None:
    token = ids.create_batch_claim(["a", "b"], ttl_s=60)
    ids.consume_claim(token, "a")
    ids.consume_claim(token, "b")
    for device, reason in (("a", "token_reused"), ("c", "wrong_device")):
        with pytest.raises(ClaimRefused) as refused:
            ids.consume_claim(token, device)
        assert refused.value.reason == reason


def test_two_enrollments_racing_with_one_token_cannot_both_win(ids: IdentityStore) -> None:
    token = ids.create_claims(["a"], ttl_s=60)["a"]
    wins: list[bool] = []

    def try_it() -> None:
        try:
            ids.consume_claim(token, "a")
            wins.append(True)
        except ClaimRefused:
            wins.append(False)

    threads = [threading.Thread(target=try_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_the_rate_limit_caps_each_device_and_the_service() -> None:
    limit = RateLimit(rate=0.001, burst=3, per_device_s=3600)
    assert limit.allow("a") and not limit.allow("a")
    assert limit.allow("b") and limit.allow("c") and not limit.allow("d")


def test_renewal_is_refused_once_revoked_and_for_an_unknown_device(
    ca: FleetCA, ids: IdentityStore
) -> None:
    service = EnrollmentService(ca, ids, limit=RateLimit(per_device_s=0))
    token = ids.create_claims(["a"], ttl_s=60)["a"]
    assert service.handle("a", "claim", _request(_csr("a"), token)).ok
    assert service.handle("a", "renew", _request(_csr("a"))).ok
    record = ids.device("a")  # the old certificate kept until the device says it has the new
    assert record is not None and not record.retired and len(record.pending) == 1
    rotated = json.dumps({"id": "r", "serial": record.pending[0]}).encode()
    assert service.handle("a", "rotated", rotated).ok
    record = ids.device("a")
    assert record is not None and len(record.retired) == 1 and record.last_rotation
    ids.revoke("a")
    refused = service.handle("a", "renew", _request(_csr("a")))
    assert (refused.ok, refused.reason) == (False, "revoked")
    assert service.handle("z", "renew", _request(_csr("z"))).reason == "not_enrolled"
    # Every certificate of a revoked device is in the CRL.
    assert len(ids.revoked_serials()) == 2


def test_a_rotated_after_its_renewal_is_not_rate_limited(ca: FleetCA, ids: IdentityStore) -> None:
    """The agent says ``rotated`` within a second of its renewal: under the per-device gap it
    was answered ``rate_limited``. It has its own gap now, and a second one is still limited."""
    service = EnrollmentService(ca, ids, limit=RateLimit(per_device_s=3600))
    token = ids.create_claims(["a"], ttl_s=60)["a"]
    assert service.handle("a", "claim", _request(_csr("a"), token)).ok
    assert service.handle("a", "renew", _request(_csr("a"))).ok
    record = ids.device("a")
    assert record is not None and len(record.pending) == 1
    rotated = json.dumps({"id": "r", "serial": record.pending[0]}).encode()
    reply = service.handle("a", "rotated", rotated)
    assert (reply.ok, reply.reason) == (True, None)
    record = ids.device("a")
    assert record is not None and len(record.retired) == 1
    for kind, payload in (("rotated", rotated), ("renew", _request(_csr("a")))):
        again = service.handle("a", kind, payload)
        assert (again.ok, again.reason) == (False, "rate_limited")
    assert service.refusals["rate_limited"] == 2


def test_a_record_the_store_cannot_read_is_refused_and_the_rest_are_read(
    ca: FleetCA, ids: IdentityStore, tmp_path: Path
) -> None:
    """An unsigned index planted (the CRL writer reads every record) and one record the store
    cannot read (a symlink loop): previous code let its StoreError out of ``devices``, so the
    CRL write at a confirmed rotation failed; now it is refused as ``unreadable``."""
    from cloud_sync.crl_disk import read_disk_crl
    from cloud_sync.crl_publish import publish_crl

    crl = tmp_path / "broker" / "crl.pem"
    service = EnrollmentService(
        ca, ids, limit=RateLimit(per_device_s=0), on_retired=lambda: publish_crl(ca, ids, crl, None)
    )
    token = ids.create_claims(["a"], ttl_s=60)["a"]
    assert service.handle("a", "claim", _request(_csr("a"), token)).ok
    publish_crl(ca, ids, crl, None, first=True)
    assert service.handle("a", "renew", _request(_csr("a"))).ok
    record = ids.device("a")
    assert record is not None and record.current is not None
    identity = tmp_path / "store" / "fleet" / "identity"
    (identity / "crl.json").write_text('{"planted": true}')
    (identity / "devices" / "loop.json").symlink_to("loop.json")
    rotated = json.dumps({"id": "r", "serial": record.pending[0]}).encode()
    assert service.handle("a", "rotated", rotated).ok
    assert int(record.current, 16) in read_disk_crl(ca, crl).entries
    assert list(ids.devices()) == ["a"]
    assert ids.refused_records == {"loop": "unreadable"}
    assert ids.refused[("device", "unreadable")] == 2


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["id", "csr", "token", "serial", "schema_version", "x"]),
            st.one_of(st.text(max_size=50), st.integers(), st.none()),
        ).map(lambda d: json.dumps(d).encode()),
    ),
    device=st.text(min_size=1, max_size=20),
    kind=st.sampled_from(["claim", "renew", "rotated", "other"]),
)
def test_hostile_requests_get_a_refusal_never_a_certificate(
    ca: FleetCA, tmp_path_factory: pytest.TempPathFactory, payload: bytes, device: str, kind: str
) -> None:
    ids = IdentityStore(open_store(str(tmp_path_factory.mktemp("h"))))
    service = EnrollmentService(ca, ids, limit=RateLimit(per_device_s=0))
    reply = service.handle(device, kind, payload)
    assert reply.ok is False and reply.certificate is None and reply.reason
    assert sum(service.refusals.values()) == 1
