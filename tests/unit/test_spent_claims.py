"""The enrollment host's list of spent claims (cloud_sync/spent_claims.py): whatever bytes the
file holds, it reads as a list or is a ConfigError, never another exception; and a list that does
not read refuses the claim (record_refused), never spends it on the bucket's word."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.enroll import EnrollmentService, RateLimit
from cloud_sync.fleet_ca import FleetCA, init_ca, new_key
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import publish_crl
from cloud_sync.spent_claims import PRUNE_MARGIN_S, SpentClaims, spent_path
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from modelpack.errors import ConfigError
from tests.support.identity_fleet import claim_request

NEAR = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=200)
    | NEAR.map(lambda v: json.dumps({"v": 1, "claims": {"h:d": v}}).encode())
)
def test_any_bytes_read_as_a_list_or_a_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "crl.pem.spent-claims.json"
    path.write_bytes(data)
    try:
        with SpentClaims(path).held() as held:
            assert held.why_not("h", "d") in (None, "spent", "revoked")
    except ConfigError as exc:
        assert str(path) in str(exc)


def test_a_list_that_does_not_read_refuses_the_claim_and_spends_nothing(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    ca, crl = FleetCA.load(tmp_path / "ca"), tmp_path / "crl.pem"
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca, crl)
    publish_crl(ca, ids, crl, None, first=True)
    token = ids.create_claims(["cam-1"], ttl_s=600)["cam-1"]
    spent_path(crl).write_bytes(b'{"v": 1, "claims": {"x:cam-1": {"why": "lost"')
    service = EnrollmentService(ca, ids, limit=RateLimit(1e3, 1000, 0))
    csr = claim_request(KeyMaker().csr(new_key(), "cam-1"), token)
    answer = service.handle("cam-1", "claim", csr)
    assert (answer.ok, answer.reason) == (False, "record_refused"), answer
    spent_path(crl).write_bytes(b'{"v":1}')  # fixed: the token was not spent by the refusal
    assert service.handle("cam-1", "claim", csr).ok
    with SpentClaims(spent_path(crl)).held() as held:  # and now it is, on the host's list
        assert [e.why for e in held.doc.claims.values()] == ["spent"]
        assert all(e.until > time.time() for e in held.doc.claims.values())


@pytest.mark.parametrize("why", ["spent", "revoked"])
def test_an_expired_entry_leaves_the_list_past_a_margin(tmp_path: Path, why: str) -> None:
    """Pruned by this host's clock only well past the claim's expiry: a clock stepped an hour
    forward for one write must not drop a live claim's entry (it could be spent again)."""
    spent, now = SpentClaims(tmp_path / "s.json"), time.time()
    old, hour_ago = now - PRUNE_MARGIN_S - 1, now - 3600
    with spent.held() as held:
        held.add("cam-1", why, [("old", old), ("hour", hour_ago), ("new", now + 60)])
    with spent.held() as held:
        held.add("cam-2", "spent", [("other", now + 60)])
    with spent.held() as held:
        assert sorted(held.doc.claims) == ["hour:cam-1", "new:cam-1", "other:cam-2"]


def test_a_rebuild_only_adds_to_a_list_that_reads_and_keeps_a_damaged_one_aside(
    tmp_path: Path,
) -> None:
    """``fleet rebuild-spent-claims`` writes through ``SpentClaims.rebuild``: what a readable
    list holds stays (``revoked`` wins over ``spent``), and whatever bytes a damaged one holds
    are kept as ``.damaged``, never lost."""
    spent = SpentClaims(tmp_path / "crl.pem.spent-claims.json")
    until = time.time() + 3600
    with spent.held() as held:
        held.add("cam-1", "spent", [("a" * 64, until)])
        held.add("cam-2", "revoked", [("b" * 64, until)])
    rebuilt = {f"{'b' * 64}:cam-2": ("spent", until), f"{'c' * 64}:cam-1": ("revoked", until)}
    assert spent.rebuild(rebuilt) is None
    with spent.held() as held:
        assert held.why_not("a" * 64, "cam-1") == "spent"  # kept
        assert held.why_not("b" * 64, "cam-2") == "revoked"  # never weakened
        assert held.why_not("c" * 64, "cam-1") == "revoked"  # added
    assert spent.problem() is None
    spent.path.write_bytes(b"\x00garbage")
    assert spent.problem() is not None and "rebuild-spent-claims" in str(spent.problem())
    damaged = spent.rebuild(rebuilt)
    assert damaged is not None and damaged.read_bytes() == b"\x00garbage"
    with spent.held() as held:
        assert held.why_not("a" * 64, "cam-1") is None  # only what the bucket says now
        assert held.why_not("b" * 64, "cam-2") == "spent"
    assert spent.problem() is None


def test_the_gauge_reads_the_list_again_only_when_the_file_changed(tmp_path: Path) -> None:
    """The metrics gauge asks ``problem()`` at each scrape: previous code parsed the whole list
    every time (0.37 s of CPU for 100k entries)."""
    listed = SpentClaims(tmp_path / "crl.pem.spent-claims.json")
    listed.create()
    reads: list[Path] = []
    real_read = listed._read

    def counted() -> object:  # the real parse, counted
        reads.append(listed.path)
        return real_read()

    listed._read = counted  # type: ignore[method-assign]
    assert [listed.problem() for _ in range(5)] == [None] * 5
    assert len(reads) == 1
    listed.path.write_bytes(b'{"v":1,"claims":{"')  # damaged: seen at the next scrape
    assert listed.problem() is not None and listed.problem() is not None
    assert len(reads) == 2
    listed.path.unlink()  # gone (no CRL copy beside it): an empty list, asked each time
    assert listed.problem() is None
    assert len(reads) == 3
