"""Device ids that no device may enroll under: every word the cloud's ACL grants at the third
level under ``+`` (with ``+`` = ``enroll`` it grants a device's enrollment topics), read from
the ACL templates themselves, so that a grant added there without its reservation fails here.

Before, ``cmd``, ``replies``, ``infer``, ``status``, ``desired`` and ``telemetry`` could be
claimed: the operator (``topic write edgebento/+/cmd/#``) could forge a refusal on
``edgebento/enroll/cmd/response`` and renew in ``cmd``'s name with a CSR of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.broker_config import claim_acl, identity_acl
from cloud_sync.enroll import EnrollmentService
from cloud_sync.fleet_ca import FleetCA, init_ca, new_key
from cloud_sync.identity_store import IdentityStore
from cloud_sync.reserved_ids import ACL_WORDS, RESERVED_IDS, reserved_records
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from modelpack.errors import ConfigError

BASE_ACL = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto" / "acl"


def _granted_words(acl: str) -> set[str]:
    """User names, and the topic level a grant names where a device id would stand: the
    second level (``edgebento/group/...``), or the third under ``+`` (``edgebento/+/cmd/#``)."""
    words: set[str] = set()
    for line in acl.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] not in ("user", "topic", "pattern"):
            continue
        if fields[0] == "user":
            words.add(fields[1])
            continue
        levels = fields[-1].split("/")
        if levels[0] != "edgebento" or len(levels) < 2:
            continue
        if levels[1] == "+" and len(levels) > 2 and levels[2] not in ("+", "#"):
            words.add(levels[2])
        elif levels[1] not in ("+", "#", "%u"):
            words.add(levels[1])
    return words


def _open_write_grants(acl: str) -> list[str]:
    """Write grants (``write``, ``readwrite``, or none said) with a wildcard at the second level
    and at the third (``edgebento/+/+/x``, ``edgebento/+/#``, ``edgebento/#``): with ``+`` =
    ``enroll`` they grant every device's enrollment topics, whatever its id, so no reserved
    word can close them; ``_granted_words`` cannot see them."""
    found = []
    for line in acl.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] not in ("topic", "pattern"):
            continue
        access = fields[1] if len(fields) > 2 else "readwrite"
        first, second, third = [*fields[-1].split("/"), "", ""][:3]
        wild = second == "#" or (second == "+" and third in ("+", "#"))
        if access in ("write", "readwrite") and first == "edgebento" and wild:
            found.append(line.strip())
    return found


def test_every_word_the_cloud_acl_grants_where_a_device_id_stands_is_reserved() -> None:
    device_listener = identity_acl(BASE_ACL.read_text())
    words = _granted_words(device_listener) | _granted_words(claim_acl())
    assert {"cmd", "replies", "infer", "status", "desired", "telemetry"} <= words
    assert words - RESERVED_IDS == set()
    assert _open_write_grants(device_listener) + _open_write_grants(claim_acl()) == []


def test_a_write_grant_open_at_the_third_level_is_found() -> None:
    """The check above has teeth: such grants are found, reads and named levels are not."""
    acl = """user operator
topic write edgebento/+/+/x
topic edgebento/+/#
topic readwrite edgebento/#
pattern write edgebento/+/+
topic read edgebento/#
topic write edgebento/+/cmd/#
topic write edgebento/enroll/+/response"""
    assert _open_write_grants(acl) == acl.splitlines()[1:5]


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    init_ca(tmp_path / "ca")
    return FleetCA.load(tmp_path / "ca")


@pytest.mark.parametrize("device", sorted(RESERVED_IDS))
def test_no_claim_and_no_certificate_for_a_reserved_id(
    tmp_path: Path, ca: FleetCA, device: str
) -> None:
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    with pytest.raises(ConfigError, match="reserved"):
        ids.create_claims([device], ttl_s=60)
    with pytest.raises(ConfigError, match="reserved"):
        ids.create_batch_claim(["cam-1", device], ttl_s=60)
    service = EnrollmentService(ca, ids)
    csr = KeyMaker().csr(new_key(), device)
    for kind in ("claim", "renew"):
        doc = {"id": "r1", "csr": csr.decode(), "token": "ebc1.x"}
        reply = service.handle(device, kind, json.dumps(doc).encode())
        assert not reply.ok and reply.reason == "bad_request", reply
        assert "reserved" in (reply.error or "")


def test_a_device_enrolled_under_an_acl_word_before_is_listed_and_can_be_revoked(
    tmp_path: Path, ca: FleetCA
) -> None:
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    cert = ca.sign_device_csr(KeyMaker().csr(new_key(), "cmd"), "cmd", days=1)
    ids.record_issue("cmd", cert, "claim")  # as the previous release let it enroll
    ids.record_issue(
        "cam-1", ca.sign_device_csr(KeyMaker().csr(new_key(), "cam-1"), "cam-1", 1), "claim"
    )
    assert reserved_records(ids.store) == ["cmd"]
    assert ids.revoke("cmd").revoked
    with pytest.raises(ConfigError, match="reserved"):
        ids.revoke("operator")
    assert "cmd" in ACL_WORDS
