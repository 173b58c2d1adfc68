"""The CRL's entries kept incrementally (``fleet/identity/crl.json``): writing the CRL reads one
object, not every device's record; a revoked device enrolled again keeps its old certificates
revoked; entries of expired certificates leave (issue 20, item 4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import FleetCA, init_ca, load_cert
from cloud_sync.identity_records import DeviceIdentity
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.store import open_store


class Counting:
    """The real local store, with the calls that read device records counted."""

    def __init__(self, store: Any) -> None:
        self.store, self.listed, self.got = store, 0, 0

    def list(self, prefix: str = "") -> list[str]:
        self.listed += 1
        return list(self.store.list(prefix))

    def get_bytes(self, key: str) -> bytes:
        self.got += 1
        return bytes(self.store.get_bytes(key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("ca")
    init_ca(out)
    return FleetCA.load(out)


def _cert(ca: FleetCA, device: str, tmp: Path, days: float = 1.0) -> Any:
    cert_file, _ = ca.issue_identity(device, tmp / "certs", days)
    return load_cert(cert_file.read_bytes())


def _serials(ids: IdentityStore) -> set[int]:
    return {serial for serial, _ in ids.revoked_serials()}


def test_writing_the_crl_reads_the_index_only(ca: FleetCA, tmp_path: Path) -> None:
    store = Counting(open_store(str(tmp_path / "store")))
    ids = IdentityStore(store, ca)  # type: ignore[arg-type]
    for i in range(12):
        ids.record_issue(f"d-{i}", _cert(ca, f"d-{i}", tmp_path), via="claim")
    first = ids.device("d-3")
    assert first is not None
    _rotated(ids, "d-3", _cert(ca, "d-3", tmp_path))  # a rotation
    store.listed = store.got = 0
    assert _serials(ids) == {int(str(first.current), 16)}
    assert (store.listed, store.got) == (0, 0)  # no device record read, whatever the fleet


def test_a_revoked_device_enrolled_again_keeps_its_old_certificates_revoked(
    ca: FleetCA, tmp_path: Path
) -> None:
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    ids.record_issue("cam", _cert(ca, "cam", tmp_path), via="claim")
    _rotated(ids, "cam", _cert(ca, "cam", tmp_path))
    old = {int(c.serial, 16) for c in ids.device("cam").certificates}  # type: ignore[union-attr]
    ids.revoke("cam")
    assert _serials(ids) == old
    # An operator issues a new claim and the device enrolls again: not revoked any more, but
    # the certificates it had when it was revoked stay in the CRL until they expire.
    ids.record_issue("cam", _cert(ca, "cam", tmp_path), via="claim")
    assert not ids.device("cam").revoked  # type: ignore[union-attr]
    assert _serials(ids) == old


def test_expired_certificates_leave_the_crl(ca: FleetCA, tmp_path: Path) -> None:
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    short = _cert(ca, "brief", tmp_path, days=3 / 86400)  # three seconds
    ids.record_issue("brief", short, via="claim")
    ids.record_issue("long", _cert(ca, "long", tmp_path), via="claim")
    ids.revoke("brief")
    ids.revoke("long")
    assert short.serial_number in _serials(ids)
    while time.time() <= short.not_valid_after_utc.timestamp():
        time.sleep(0.2)  # until the certificate has expired: refused by its date from then on
    assert short.serial_number not in _serials(ids) and len(_serials(ids)) == 1


def test_a_store_from_before_the_index_gets_it_built_once(ca: FleetCA, tmp_path: Path) -> None:
    raw = open_store(str(tmp_path / "store"))
    ids = IdentityStore(raw, ca)
    ids.record_issue("a", _cert(ca, "a", tmp_path), via="claim")
    _rotated(ids, "a", _cert(ca, "a", tmp_path))
    ids.record_issue("b", _cert(ca, "b", tmp_path), via="claim")
    ids.revoke("b")
    expected = _serials(ids)
    assert len(expected) == 2
    raw.delete(CRL_INDEX)  # as a store written before the index existed
    counting = Counting(raw)
    again = IdentityStore(counting, ca)  # type: ignore[arg-type]
    assert _serials(again) == expected  # built from the records
    counting.listed = 0
    assert _serials(again) == expected and counting.listed == 0  # and kept


def _rotated(ids: IdentityStore, device: str, cert: Any) -> DeviceIdentity:
    """A renewal the device took up: issued, then its ``rotated`` (the old one retired)."""
    doc = ids.record_issue(device, cert, via="renew")
    return ids.confirm_rotation(device, doc.pending[-1])
