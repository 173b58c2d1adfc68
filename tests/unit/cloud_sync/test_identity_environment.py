"""Identity records are signed for the store they are written in
(``cloud_sync.identity_environment``): two environments that share one fleet CA do not take
each other's records or CRL index, and whatever bytes a bucket writer leaves under the records'
prefix is refused with a reason, never read and never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.fleet_ca import FleetCA, init_ca, load_cert
from cloud_sync.identity_environment import EnvironmentCA, checking_ca
from cloud_sync.identity_records import DeviceIdentity, RecordRefused, opened, sign
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.store import open_store
from modelpack.errors import ConfigError

KEY = "fleet/identity/devices/cam-1.json"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("ca")
    init_ca(out)
    return FleetCA.load(out)


def _cert(ca: FleetCA, device: str, tmp: Path) -> Any:
    cert_file, _ = ca.issue_identity(device, tmp / "certs", 1.0)
    return load_cert(cert_file.read_bytes())


def test_a_record_and_the_index_copied_to_another_store_of_the_same_ca_are_misplaced(
    ca: FleetCA, tmp_path: Path
) -> None:
    staging = IdentityStore(open_store(str(tmp_path / "staging")), ca)
    prod = IdentityStore(open_store(str(tmp_path / "prod")), ca)
    staging.record_issue("cam-1", _cert(ca, "cam-1", tmp_path), via="claim")
    staging.revoke_serial(_cert(ca, "claim", tmp_path).serial_number, 2e9)
    for key in (KEY, CRL_INDEX):
        prod.store.put_bytes(key, staging.store.get_bytes(key))
    with pytest.raises(RecordRefused) as record:
        prod.device("cam-1")
    with pytest.raises(RecordRefused) as index:
        prod.crl_index()
    for refused in (record.value, index.value):
        assert refused.reason == "misplaced"
        assert "staging" in str(refused) and "another environment" in str(refused)
    assert prod.refused[("device", "misplaced")] == 1
    assert prod.refused[("crl_index", "misplaced")] == 1
    assert staging.device("cam-1") is not None and staging.crl_index().entries  # still good


@settings(max_examples=40, deadline=None)
@given(ours=st.text(max_size=40), theirs=st.text(max_size=40))
def test_a_record_verifies_in_the_environment_it_was_signed_for_and_no_other(
    ca: FleetCA, ours: str, theirs: str
) -> None:
    body = DeviceIdentity(device="cam-1").model_dump_json().encode()
    data = sign(EnvironmentCA(ca, theirs), KEY, body)
    assert json.loads(data)["environment"] == theirs  # plain JSON: shown by any tool
    if ours == theirs:
        assert DeviceIdentity.model_validate_json(opened(EnvironmentCA(ca, ours), KEY, data))
        return
    with pytest.raises(RecordRefused) as refused:
        opened(EnvironmentCA(ca, ours), KEY, data)
    assert refused.value.reason == "misplaced" and "\n" not in str(refused.value)


def test_the_ca_itself_neither_signs_nor_checks_a_record_bound_to_no_store(
    ca: FleetCA, tmp_path: Path
) -> None:
    body = DeviceIdentity(device="cam-1").model_dump_json().encode()
    with pytest.raises(ConfigError, match="for a store"):
        sign(ca, KEY, body)
    data = sign(EnvironmentCA(ca, "s3://b/prod"), KEY, body)
    with pytest.raises(ConfigError, match="for a store"):
        opened(ca, KEY, data)
    # The issuing certificate alone checks records and signs none.
    checker = EnvironmentCA(checking_ca(ca.paths.issuing_cert.parent.parent), "s3://b/prod")
    assert opened(checker, KEY, data)
    with pytest.raises(ConfigError, match="issuing key"):
        sign(checker, KEY, body)


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_HOSTILE = st.one_of(
    st.binary(max_size=200),
    _JSON.map(lambda doc: json.dumps(doc).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # deeper than Python's stack
    st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.fixed_dictionaries(
        {"device": st.text(max_size=8), "signature": st.text(max_size=20)},
        optional={"certificates": _JSON, "revoked": _JSON, "environment": _JSON},
    ).map(lambda doc: json.dumps(doc).encode()),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_HOSTILE)
def test_whatever_a_bucket_writer_leaves_is_refused_with_a_reason_never_a_crash(
    ca: FleetCA, tmp_path: Path, data: bytes
) -> None:
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(KEY, data)
    for reader in (IdentityStore(store, ca), IdentityStore(store)):  # checked, and shown only
        found = reader.devices()
        assert reader.ca is None or found == {}  # nothing the CA did not sign is read
        assert set(found) | set(reader.refused_records) == {"cam-1"}
    revoked = IdentityStore(store, ca).revoke("cam-1")  # a revocation goes through it
    assert revoked.revoked is True and len(revoked.certificates) <= 20
