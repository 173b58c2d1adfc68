"""A stolen device key cannot grow the CRL without bound: each device has a renewal budget
(cloud_sync.renewal_budget), kept in its signed record in the store and spent inside the
record's compare-and-swap. Moto's S3 server, Mosquitto with mTLS, the real enrollment service
(in this process, and ``fleet enroll-service`` in its own); each test failing on the previous
code, where a device renewed and rotated 20 times in a row, every old certificate into the CRL:

- a device renewing and rotating over its own mTLS connection, a new key each time, is refused
  ``renewal_budget`` past the budget (4 a day by default), and the CRL lists no more than that;
- two services sharing the bucket, asked at once, let the budget through once between them; a
  replayed request (its id already answered) spends nothing; clocks hours apart change nothing;
- ``fleet enroll-service --renewal-budget`` takes its budget from the flag and counts its
  refusals in /metrics."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import EnrollmentService, EnrollReply, RateLimit, enroll_topic
from cloud_sync.fleet_ca import FleetCA, load_cert, new_key, write_private
from cloud_sync.identity_store import IdentityStore
from cloud_sync.renewal_budget import RenewalBudget
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from tests.integration.test_identity_store_writer import _enroll, idfleet
from tests.support.agent import wait_for
from tests.support.identity_cli import start_enroll_service
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request

__all__ = ["idfleet"]


def _crl_serials(fleet: IdentityFleet) -> set[int]:
    from cryptography import x509

    crl = x509.load_pem_x509_crl(fleet.ca.paths.crl.read_bytes())
    return {entry.serial_number for entry in crl}


def _ask(conn: Any, answers: Any, device: str, kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` sent on the device's ``kind`` topic until it is answered other than
    ``rate_limited`` (the service's gap of a second per device); the answer."""
    while True:
        request_id = uuid.uuid4().hex
        conn.publish(enroll_topic(PREFIX, device, kind), {**doc, "id": request_id})
        answer = wait_for(answers, lambda d, i=request_id: d.get("id") == i, 20)
        if answer.get("reason") != "rate_limited":
            return answer


def _renew_and_rotate(fleet: IdentityFleet, device: str, files: Path) -> dict[str, Any]:
    """What a thief with the device's key does: renew over the device's own mTLS connection
    with a new key, and on a certificate, say ``rotated`` (which retires the old one into the
    CRL) and go on with the new one. The renewal's answer."""
    fleet.certs[device] = (files / "d.crt", files / "d.key")
    conn = fleet.client(device)
    try:
        answers = conn.collect(enroll_topic(PREFIX, device, "response"))
        key = new_key()
        request = json.loads(claim_request(KeyMaker().csr(key, device), None))
        answer = _ask(conn, answers, device, "renew", request)
        if not answer["ok"]:
            return answer
        serial = format(load_cert(answer["certificate"].encode()).serial_number, "x")
        confirmed = _ask(conn, answers, device, "rotated", {"schema_version": 1, "serial": serial})
        assert confirmed["ok"] is True, confirmed
    finally:
        conn.close()
    (files / "d.crt").write_text(answer["certificate"])
    write_private(files / "d.key", key)
    return answer


def _wait_answering(fleet: IdentityFleet, device: str, files: Path) -> None:
    """Until a service answers the device's enrollment topics: a ``rotated`` for a serial it
    does not hold is answered ``bad_request`` and spends nothing."""
    fleet.certs[device] = (files / "d.crt", files / "d.key")
    conn = fleet.client(device)
    answers = conn.collect(enroll_topic(PREFIX, device, "response"))
    deadline = time.monotonic() + 60
    try:
        while True:
            probe_id = uuid.uuid4().hex
            probe = {"schema_version": 1, "id": probe_id, "serial": "0"}
            conn.publish(enroll_topic(PREFIX, device, "rotated"), probe)
            try:
                wait_for(answers, lambda d, i=probe_id: d.get("id") == i, 2)
                return
            except AssertionError:
                assert time.monotonic() < deadline, "no enrollment service answers"
    finally:
        conn.close()


def test_a_stolen_key_renewing_in_a_loop_is_stopped_by_its_budget_and_the_crl_stays_small(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = f"thief-{uuid.uuid4().hex[:6]}"
    files = _enroll(idfleet, device, tmp_path)
    listed_before = _crl_serials(idfleet)
    refused_before = idfleet.service.refusals["renewal_budget"]
    answers = [_renew_and_rotate(idfleet, device, files) for _ in range(20)]
    ok = [a for a in answers if a["ok"]]
    assert len(ok) == 4, [a.get("reason") for a in answers]  # the default: 4 a day
    refused = answers[4:]
    assert {a["reason"] for a in refused} == {"renewal_budget"}, refused[0]
    assert all(a.get("certificate") is None for a in refused)
    assert "try again in" in refused[0]["error"] and refused[0]["retry_after_s"] > 3600
    assert idfleet.service.refusals["renewal_budget"] - refused_before == 16
    # What the CRL gained: the four certificates it rotated away from, no more.
    idfleet.publish_crl()
    record = idfleet.ids.device(device)
    assert record is not None and len(record.retired) == 4 and len(record.renewals) == 4
    gained = _crl_serials(idfleet) - listed_before
    assert gained == {int(s, 16) for s in record.retired}
    # The budget is the device id's: its fifth key, the one it runs with now, renews no more.
    assert _renew_and_rotate(idfleet, device, files)["reason"] == "renewal_budget"


def _service(fleet: IdentityFleet, budget: RenewalBudget) -> EnrollmentService:
    """Another enrollment service on the same bucket: its own store client and CA object."""
    ca = FleetCA.load(fleet.root / "ca")
    store = open_store(fleet.ids.store.url, endpoint_url=fleet.endpoint_url)
    ids = IdentityStore(store, ca, fleet.ca.paths.crl)
    return EnrollmentService(ca, ids, limit=RateLimit(1e4, 10_000, 0.0), budget=budget)


def test_two_services_sharing_the_bucket_spend_one_budget_and_a_replay_spends_nothing(
    idfleet: IdentityFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = f"pair-{uuid.uuid4().hex[:6]}"
    _enroll(idfleet, device, tmp_path)
    budget = RenewalBudget(count=3, window_s=86400.0)
    services = [_service(idfleet, budget), _service(idfleet, budget)]
    requests = [claim_request(KeyMaker().csr(new_key(), device), None) for _ in range(8)]
    answers: list[EnrollReply] = []
    start = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        start.wait()
        answers.append(services[i % 2].handle(device, "renew", requests[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(str(a.reason) for a in answers) == ["None"] * 3 + ["renewal_budget"] * 5
    record = idfleet.ids.device(device)
    assert record is not None and len(record.renewals) == 3 and len(record.pending) == 3
    # A request already answered, delivered again (to the other service): nothing spent.
    answered = next(a.id for a in answers if a.ok)
    again = next(r for r in requests if json.loads(r)["id"] == answered)
    reply = services[1].handle(device, "renew", again)
    assert (reply.ok, reply.reason) == (False, "replayed")
    # Clocks hours apart, ahead or behind: still refused, and nothing added to the record.
    real = time.time
    for skew in (6 * 3600, -6 * 3600):
        with monkeypatch.context() as clock:
            clock.setattr(time, "time", lambda s=skew: real() + s)
            fresh = claim_request(KeyMaker().csr(new_key(), device), None)
            assert services[0].handle(device, "renew", fresh).reason == "renewal_budget"
    after = idfleet.ids.device(device)
    assert after is not None and after.renewals == record.renewals
    assert after.certificates == record.certificates


def _metric(port: int, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_the_cli_service_takes_its_budget_from_the_flag_and_counts_its_refusals(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = f"cli-{uuid.uuid4().hex[:6]}"
    files = _enroll(idfleet, device, tmp_path)
    idfleet.service.stop()  # the CLI's service takes over the enrollment topics
    cert, key = idfleet.certs["enroll"]
    log = tmp_path / "enroll.log"
    service, metrics = start_enroll_service(
        [
            "--broker", idfleet.broker.url, "--ca", str(idfleet.root / "ca"),
            "--cert", str(cert), "--key", str(key), "--store", str(idfleet.ids.store.url),
            "--endpoint-url", str(idfleet.endpoint_url), "--renewal-budget", "2/1h",
        ],
        log,
    )  # fmt: skip
    try:
        refusals = 'edgebento_enrollment_refusals_total{reason="renewal_budget"}'
        assert _metric(metrics, refusals) == 0.0  # there from the start: its alert sees one
        _wait_answering(idfleet, device, files)
        answers = [_renew_and_rotate(idfleet, device, files) for _ in range(3)]
        assert [a["ok"] for a in answers] == [True, True, False], answers[-1]
        third = answers[-1]
        assert third["reason"] == "renewal_budget", third
        assert 0 < third["retry_after_s"] <= 3600
        assert _metric(metrics, refusals) == 1.0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
        idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        idfleet.service.wait_serving(30)


def test_a_rotated_that_retires_nothing_new_rewrites_no_crl(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    """Previous code: every ``rotated`` of a device that had ever rotated rewrote the CRL and
    signalled the broker, retired or not: a stolen key could make the enrollment host rebuild
    the whole CRL (superlinear) once a second without spending any budget; and before the
    next fix each still read and parsed the fleet-wide crl.json index."""
    device = f"again-{uuid.uuid4().hex[:6]}"
    files = _enroll(idfleet, device, tmp_path)
    first = idfleet.ids.device(device)
    assert first is not None and first.current is not None
    writes: list[float] = []
    publish = idfleet.service.on_retired
    assert publish is not None

    def counted() -> None:  # the fleet's own CRL write, counted
        writes.append(time.monotonic())
        publish()

    idfleet.service.on_retired = counted
    try:
        assert _renew_and_rotate(idfleet, device, files)["ok"] is True
        assert len(writes) == 1  # the rotation retired the first certificate: written
        assert int(first.current, 16) in _crl_serials(idfleet)
        current = idfleet.ids.device(device)
        assert current is not None and current.current is not None
        idfleet.certs[device] = (files / "d.crt", files / "d.key")
        ids, index_reads = idfleet.service.ids, []
        read_index = ids.read_index

        def counted_read() -> tuple[bytes, str]:  # the real read of the fleet's index, counted
            index_reads.append(time.monotonic())
            return read_index()

        ids.read_index = counted_read  # type: ignore[method-assign]
        conn = idfleet.client(device)
        answers = conn.collect(enroll_topic(PREFIX, device, "response"))
        for _ in range(5):
            again = {"schema_version": 1, "serial": current.current}
            assert _ask(conn, answers, device, "rotated", again)["ok"] is True
        conn.close()
        assert len(writes) == 1
        assert index_reads == []  # and the fleet-wide index (crl.json) is not even read
    finally:
        idfleet.service.on_retired = publish
        vars(idfleet.service.ids).pop("read_index", None)


def test_the_cli_service_refuses_a_validity_its_budget_would_let_expire(
    idfleet: IdentityFleet,
) -> None:
    """6 h certificates renewed at 2/3 of their life need 8 renewals a day (one lost answer
    included) and a refused device would wait past its certificate's end: ``fleet
    enroll-service`` does not start, naming both settings and the budget it needs. Previous
    code: it started, and the fleet expired after upgrading to the 4/24h default."""
    import subprocess
    import sys

    from tests.support.identity_cli import REPO

    cert, key = idfleet.certs["enroll"]
    done = subprocess.run(
        [
            sys.executable, "-m", "edgebento", "fleet", "enroll-service",
            "--broker", idfleet.broker.url, "--ca", str(idfleet.root / "ca"),
            "--cert", str(cert), "--key", str(key), "--store", str(idfleet.ids.store.url),
            "--endpoint-url", str(idfleet.endpoint_url), "--validity", "6h",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    for words in ("--validity 6 h", "--renewal-budget 4/24h", "--renewal-budget 8/24h"):
        assert words in said, said
    assert "Traceback" not in said, said
