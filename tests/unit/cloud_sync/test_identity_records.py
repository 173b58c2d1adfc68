"""Device records and the CRL's index are signed by the fleet CA and checked when read back
(``cloud_sync.identity_records``): a writer to the store without the CA's key can change no
byte of one, move one onto another device's object, or sign one with a key of its own."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.fleet_ca import FleetCA, init_ca, load_cert
from cloud_sync.identity_environment import EnvironmentCA
from cloud_sync.identity_records import DeviceIdentity, RecordRefused, opened, sign
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.store import open_store
from modelpack.errors import StoreError


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("ca")
    init_ca(out)
    return FleetCA.load(out)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("other-ca")
    init_ca(out)
    return FleetCA.load(out)


@pytest.fixture(scope="module")
def signed(ca: FleetCA, tmp_path_factory: pytest.TempPathFactory) -> tuple[IdentityStore, bytes]:
    """A store holding a revoked device's signed record, and that record's bytes."""
    tmp = tmp_path_factory.mktemp("signed")
    ids = IdentityStore(open_store(str(tmp / "store")), ca)
    ids.record_issue("cam-1", _cert(ca, "cam-1", tmp), via="claim")
    _rotated(ids, "cam-1", _cert(ca, "cam-1", tmp))
    ids.revoke("cam-1")
    return ids, ids.store.get_bytes("fleet/identity/devices/cam-1.json")


def _cert(ca: FleetCA, device: str, tmp: Path) -> Any:
    cert_file, _ = ca.issue_identity(device, tmp / "certs", 1.0)
    return load_cert(cert_file.read_bytes())


def test_a_record_stays_plain_json_with_the_signature_last(
    signed: tuple[IdentityStore, bytes],
) -> None:
    ids, data = signed
    doc = json.loads(data)
    assert doc["device"] == "cam-1" and doc["revoked"] is True
    assert list(doc)[-1] == "signature"
    record = ids.device("cam-1")
    assert record is not None and record.revoked and len(record.certificates) == 2


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_edit_of_a_signed_record_is_refused_or_changes_nothing(
    signed: tuple[IdentityStore, bytes], data: st.DataObject
) -> None:
    ids, original = signed
    at = data.draw(st.integers(0, len(original) - 1), label="at")
    cut = data.draw(st.integers(0, 8), label="cut")
    put = data.draw(st.binary(min_size=0, max_size=8), label="put")
    edited = original[:at] + put + original[at + cut :]
    expected = ids.device("cam-1")
    key = "fleet/identity/devices/cam-1.json"
    reader = IdentityStore(ids.store, ids.ca)  # the same store: edited in place, put back
    ids.store.put_bytes(key, edited)
    try:
        record = reader.device("cam-1")
    except RecordRefused as exc:
        assert exc.reason in {"forged", "unsigned", "malformed"}
        assert "\n" not in str(exc) and "cam-1.json" in str(exc)
        assert reader.refused[("device", exc.reason)] == 1
        return
    except StoreError as exc:  # signed bytes as they were, but not a record (cannot happen)
        pytest.fail(f"a signed record was read as something else: {exc}")
    finally:
        ids.store.put_bytes(key, original)
    # Read without a refusal: only if the edit left every signed byte as it was (a base64
    # character whose ignored low bits changed, say).
    assert record == expected


def test_a_record_moved_onto_another_devices_object_is_refused(
    signed: tuple[IdentityStore, bytes],
) -> None:
    ids, data = signed
    assert ids.ca is not None
    with pytest.raises(RecordRefused) as moved:
        opened(ids.ca, "fleet/identity/devices/cam-2.json", data)
    assert moved.value.reason == "forged"
    with pytest.raises(RecordRefused):  # nor can a record pass for the index
        opened(ids.ca, CRL_INDEX, data)


def test_a_record_signed_by_another_key_or_unsigned_is_refused(
    signed: tuple[IdentityStore, bytes], ca: FleetCA, other_ca: FleetCA, tmp_path: Path
) -> None:
    _, data = signed
    drop = ("signature", "environment")
    body = json.dumps({k: v for k, v in json.loads(data).items() if k not in drop}).encode()
    key = "fleet/identity/devices/cam-1.json"
    store = open_store(str(tmp_path / "store"))
    reader = IdentityStore(store, ca)
    store.put_bytes(key, sign(EnvironmentCA(other_ca, store.url), key, body))
    with pytest.raises(RecordRefused) as foreign:
        reader.device("cam-1")
    assert foreign.value.reason == "forged"
    store.put_bytes(key, body)  # as the release before wrote it
    with pytest.raises(RecordRefused) as old:
        reader.device("cam-1")
    assert old.value.reason == "unsigned"
    assert "edgebento fleet identity-repair" in str(old.value)
    # Without a CA the record is shown, never acted on: a write needs the CA.
    viewer = IdentityStore(store)
    assert viewer.device("cam-1") is not None
    with pytest.raises(Exception, match="fleet CA"):
        viewer.revoke("cam-1")


def test_listing_leaves_out_refused_records_and_says_which(
    ca: FleetCA, tmp_path: Path, caplog: Any
) -> None:
    store = open_store(str(tmp_path / "store"))
    ids = IdentityStore(store, ca)
    ids.record_issue("cam-1", _cert(ca, "cam-1", tmp_path), via="claim")
    planted = {"device": "ghost", "certificates": [], "current": None}
    store.put_bytes("fleet/identity/devices/ghost.json", json.dumps(planted).encode())
    with caplog.at_level(logging.ERROR):
        found = ids.devices()
    assert list(found) == ["cam-1"] and ids.refused_records == {"ghost": "unsigned"}
    assert any("ghost.json" in r.getMessage() for r in caplog.records)


def test_while_the_index_does_not_verify_the_crl_never_gets_shorter(
    ca: FleetCA, tmp_path: Path, caplog: Any
) -> None:
    from cryptography import x509

    from cloud_sync.revocation import publish_crl

    def listed(crl: Path) -> set[int]:
        return {r.serial_number for r in x509.load_pem_x509_crl(crl.read_bytes())}

    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    ids.record_issue("a", _cert(ca, "a", tmp_path), via="claim")
    ids.revoke("a")
    claim = _cert(ca, "claim", tmp_path)  # a certificate that is no device's: in the index only
    ids.revoke_serial(claim.serial_number, claim.not_valid_after_utc.timestamp())
    crl = tmp_path / "crl.pem"
    publish_crl(ca, ids, crl, None, first=True)  # none on disk yet: the first
    before = listed(crl)
    assert len(before) == 2
    # A writer to the bucket empties the index; then a device rotates.
    ids.store.put_bytes(CRL_INDEX, b'{"schema_version":1,"entries":[]}')
    ids.record_issue("b", _cert(ca, "b", tmp_path), via="claim")
    retired = ids.device("b").current  # type: ignore[union-attr]
    _rotated(ids, "b", _cert(ca, "b", tmp_path))
    with caplog.at_level(logging.ERROR):
        publish_crl(ca, ids, crl, None)  # each entry kept until its certificate expires
    assert before | {int(str(retired), 16)} <= listed(crl)
    assert any("crl.json" in r.getMessage() and "identity-repair" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def _rotated(ids: IdentityStore, device: str, cert: Any) -> DeviceIdentity:
    """A renewal the device took up: issued, then its ``rotated`` (the old one retired)."""
    doc = ids.record_issue(device, cert, via="renew")
    return ids.confirm_rotation(device, doc.pending[-1])
