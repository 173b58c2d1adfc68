"""Records under reserved ids in a real S3 store (moto's server): ``enroll-service`` says at
start which ids to revoke, and ``fleet revoke`` revokes them, cloud names included (``broker``
and ``revocation-probe`` were reserved only since e17baad, so records under them can exist;
before, ``check_revocable`` refused them while the warning said to revoke them). A store that
cannot be listed at start (its endpoint down) is logged and the service goes on, as it did
before the warning: it raised StoreError and ``enroll-service`` stopped at start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cloud_sync.fleet_ca import FleetCA, init_ca, new_key
from cloud_sync.identity_store import IdentityStore
from cloud_sync.s3store import S3Store
from edge_agent.identity import KeyMaker
from edgebento.cli.fleet_identity import _warn_reserved
from modelpack.errors import ConfigError
from tests.support.services import MotoS3, free_port


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    init_ca(tmp_path / "ca")
    return FleetCA.load(tmp_path / "ca")


def test_records_under_reserved_cloud_names_are_said_and_can_be_revoked(
    ca: FleetCA, s3_server: MotoS3, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = S3Store(s3_bucket, "fleet", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    ids = IdentityStore(store, ca)
    for device in ("broker", "revocation-probe", "cam-1"):  # as earlier releases let them enroll
        cert = ca.sign_device_csr(KeyMaker().csr(new_key(), device), device, days=1)
        ids.record_issue(device, cert, "claim")
    with caplog.at_level(logging.WARNING, logger="edgebento.fleet"):
        _warn_reserved(ids)
    assert "reserved ids broker, revocation-probe" in caplog.text
    assert "fleet revoke" in caplog.text
    for device in ("broker", "revocation-probe"):
        doc = ids.revoke(device)
        assert doc.revoked and len(doc.certificates) == 1, doc
    serials = ids.revoked_serials()
    assert len(serials) == 2
    # No record: nothing to revoke, and no record written under a cloud name or an ACL word.
    for device in ("operator", "cmd"):
        with pytest.raises(ConfigError, match="reserved"):
            ids.revoke(device)
        assert ids.device(device) is None


def test_a_store_down_at_start_is_logged_and_the_service_goes_on(
    ca: FleetCA, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("fleet", endpoint_url=closed, region="us-east-1", max_attempts=1)
    ids = IdentityStore(store, ca)
    with caplog.at_level(logging.ERROR, logger="edgebento.fleet"):
        _warn_reserved(ids)  # raised StoreError before
    assert "cannot list device records for reserved ids" in caplog.text
    assert closed in caplog.text or "127.0.0.1" in caplog.text
