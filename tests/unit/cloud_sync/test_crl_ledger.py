"""The CRL's ledger (``cloud_sync.crl_disk``): each listed certificate's notAfter and each
revoked device, signed into the CRL; read back as written, never earlier than written."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.crl_disk import read_disk_crl
from cloud_sync.crl_publish import publish_crl
from cloud_sync.fleet_ca import FleetCA, init_ca
from cloud_sync.identity_store import IdentityStore
from cloud_sync.store import open_store


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("ca")
    init_ca(out)
    return FleetCA.load(out)


serials = st.integers(1, (1 << 159) - 1)
times = st.floats(1e9, 4e9, allow_nan=False)
devices = st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    listed=st.dictionaries(serials, times, max_size=40),  # past 127 and 255 bytes of ledger
    revoked=st.dictionaries(devices, times, max_size=40),
)
def test_the_ledger_reads_back_as_written_and_never_earlier(
    ca: FleetCA, tmp_path: Path, listed: dict[int, float], revoked: dict[str, float]
) -> None:
    from cloud_sync.crl_disk import crl_pem

    when = dt.datetime.now(dt.UTC)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_pem(ca, [(s, when) for s in listed], 7, listed, revoked))
    disk = read_disk_crl(ca, crl)
    assert (set(disk.entries), disk.number) == (set(listed), 7)
    assert set(disk.not_after) == set(listed) and set(disk.devices) == set(revoked)
    for serial, not_after in listed.items():
        assert not_after <= disk.not_after[serial] < not_after + 1
    for device, at in revoked.items():
        assert at <= disk.devices[device] < at + 0.002


def test_an_entry_stays_until_its_certificate_expires_and_a_crl_without_a_ledger_keeps_all(
    ca: FleetCA, tmp_path: Path
) -> None:
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    crl, now = tmp_path / "crl.pem", dt.datetime.now(dt.UTC)
    # A CRL from before the ledger, with an entry revoked 400 days ago: kept, its expiry unknown.
    crl.write_bytes(ca.crl([(11, now - dt.timedelta(days=400))]))
    live, gone = now.timestamp() + 3600, now.timestamp() - 1
    publish_crl(ca, ids, crl, None, extra={12: live, 13: gone}, devices={"cam-1": 5.0})
    disk = read_disk_crl(ca, crl)
    assert set(disk.entries) == {11, 12}  # 13 expired already
    assert disk.not_after[12] >= live and 11 not in disk.not_after
    publish_crl(ca, ids, crl, None)  # written again: nothing leaves, the device stays named
    again = read_disk_crl(ca, crl)
    assert set(again.entries) == {11, 12} and again.devices == {"cam-1": 5.0}
    assert {r.serial_number for r in x509.load_pem_x509_crl(crl.read_bytes())} == {11, 12}
