"""The enrollment host keeps the broker's CRL good while it runs, as Mosquitto 2.0.11 meets it:
a SIGHUP (Debian's daily logrotate) over a damaged CRL leaves the broker running with NO CRL
check. The running ``fleet enroll-service`` checks the CRL on disk every ``--crl-check`` and
puts the last good copy back at once (and signals the broker), also while its store fails, which
no longer ends the service; ``fleet revoke`` writes past a device record the store cannot read;
``fleet broker-config`` run again keeps the live CRL; the identity metrics read another CA's
CRL as 0 and count restores. Each failed on the previous code (see each test)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_sync.broker_config import BrokerTls
from cloud_sync.crl_disk import last_good, parse_crl, read_disk_crl
from cloud_sync.crl_publish import publish_crl
from cloud_sync.enroll import EnrollmentService
from cloud_sync.fleet_ca import FleetCA, init_ca, load_cert, tls_context
from cloud_sync.identity_metrics import IdentityCollector
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import _connect, revoke_serial
from cloud_sync.store import open_store
from modelpack.errors import ConfigError
from tests.integration.test_crl_last_good import _until
from tests.support.agent import REPO
from tests.support.identity_cli import start_enroll_service
from tests.support.services import Mosquitto, free_port


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@dataclass
class Fleet:
    tmp: Path
    ca: FleetCA
    ids: IdentityStore
    crl: Path
    broker: Mosquitto
    ids_dir: Path
    bad_serial: int

    @property
    def pid(self) -> int:
        assert self.broker.process is not None
        return self.broker.process.pid

    def connects(self, name: str) -> bool:
        files = (self.ids_dir / f"{name}.crt", self.ids_dir / f"{name}.key")
        ctx = tls_context(self.ca.paths.bundle, *files)
        client = f"p-{uuid.uuid4().hex[:8]}"
        return _connect(ctx, client, "127.0.0.1", self.broker.port, timeout=10)

    def damage(self) -> None:
        """A truncated CRL and the broker reloaded (logrotate's postrotate)."""
        good = self.crl.read_bytes()
        self.crl.write_bytes(good[: len(good) // 2])
        os.kill(self.pid, signal.SIGHUP)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    init_ca(tmp_path / "ca")
    ca = FleetCA.load(tmp_path / "ca")
    out = tmp_path / "ids"
    server = ca.issue_identity("broker", out, 30, ["127.0.0.1", "localhost"])
    for name in ("good-1", "bad-1", "enroll"):
        ca.issue_identity(name, out)
    bad = load_cert((out / "bad-1.crt").read_bytes())
    crl = tmp_path / "broker" / "crl.pem"
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    revoked = {bad.serial_number: bad.not_valid_after_utc.timestamp()}
    publish_crl(ca, ids, crl, None, revoked, {"bad-1": time.time()}, first=True)
    tls = BrokerTls(ca.paths.bundle, server[0], server[1], crl)
    broker = Mosquitto(workdir=tmp_path / "mosquitto", tls=tls).start()
    try:
        yield Fleet(tmp_path, ca, ids, crl, broker, out, bad.serial_number)
    finally:
        broker.stop()


@contextlib.contextmanager
def _enroll_service(
    fleet: Fleet, refresh: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``fleet enroll-service`` in its own process, checking the CRL every second; stopped
    (SIGTERM) at the end."""
    log = fleet.tmp / "enroll.log"
    service, metrics = start_enroll_service(
        [
            "--broker", f"mqtts://127.0.0.1:{fleet.broker.port}",
            "--ca", str(fleet.tmp / "ca"), "--cert", str(fleet.ids_dir / "enroll.crt"),
            "--key", str(fleet.ids_dir / "enroll.key"), "--store", str(fleet.tmp / "store"),
            "--crl-file", str(fleet.crl), "--broker-pid", str(fleet.pid),
            "--crl-refresh", refresh, "--crl-check", "1s",
        ],
        log,
    )  # fmt: skip
    try:
        yield service, metrics, log
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)


def _restored(metrics: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith("edgebento_identity_crl_restored_total "):
            return float(line.split()[1])
    return None


def _verifies(fleet: Fleet) -> bool:
    try:
        read_disk_crl(fleet.ca, fleet.crl)
    except ConfigError:
        return False
    return True


def test_the_running_service_puts_a_damaged_crl_back_within_its_check(fleet: Fleet) -> None:
    """Previous code: nothing checked the CRL between refreshes (--crl-refresh, 24 h), so the
    broker ran without a CRL check until then (the previous code, run with --crl-refresh 1h
    and no --crl-check, never put it back)."""
    with _enroll_service(fleet, "1h") as (service, metrics, log):
        assert _restored(metrics) == 0.0  # there from the start: the first restore alerts
        assert not fleet.connects("bad-1") and fleet.connects("good-1")
        fleet.damage()
        _until(lambda: _verifies(fleet), "the last good CRL put back by the running service")
        _until(lambda: not fleet.connects("bad-1"), "bad-1 refused again (broker signalled)")
        assert fleet.connects("good-1")
        assert last_good(fleet.crl).read_bytes() == fleet.crl.read_bytes()
        assert _restored(metrics) == 1.0
        assert "put back the last good copy" in log.read_text()
        assert service.poll() is None, log.read_text()


def test_a_refresh_that_fails_keeps_the_service_and_the_crl_is_still_put_back(
    fleet: Fleet,
) -> None:
    """Previous code: the first refresh that met the failing store ended the service (exit 1,
    StoreError out of its loop), and nothing put the damaged CRL back."""
    with _enroll_service(fleet, "1s") as (service, _metrics, log):
        # The store goes away: a file where its directory was. Refreshes fail, logged.
        (fleet.tmp / "store").rename(fleet.tmp / "store.away")
        (fleet.tmp / "store").write_text("not a store")
        _until(lambda: "the CRL refresh failed" in log.read_text(), "a failed refresh logged")
        fleet.damage()
        _until(lambda: _verifies(fleet), "the last good CRL put back though the store fails")
        _until(lambda: not fleet.connects("bad-1"), "bad-1 refused again (broker signalled)")
        assert service.poll() is None, log.read_text()
        # The store back: the next refresh writes the CRL again, bad-1 still listed.
        (fleet.tmp / "store").unlink()
        (fleet.tmp / "store.away").rename(fleet.tmp / "store")
        before = fleet.crl.read_bytes()
        _until(lambda: fleet.crl.read_bytes() != before, "the CRL refreshed again")
        assert fleet.bad_serial in read_disk_crl(fleet.ca, fleet.crl).entries
        assert service.poll() is None, log.read_text()


def test_fleet_revoke_writes_past_a_record_that_cannot_be_read_after_a_restore(
    fleet: Fleet,
) -> None:
    """A bucket writer plants an index the CA did not sign (the writer then reads every
    record) and a record that cannot be read (a symlink loop): that record is refused as
    ``unreadable`` and the CRL is written from the rest, over the last good copy put back, and
    the broker signalled. Previous code: the StoreError of that one record failed every CRL
    write (``fleet revoke`` exited 1)."""
    identity = fleet.tmp / "store" / "fleet" / "identity"
    (identity / "crl.json").write_text('{"planted": true}')
    (identity / "devices").mkdir(parents=True, exist_ok=True)
    os.symlink("loop.json", identity / "devices" / "loop.json")
    fleet.damage()
    _until(lambda: fleet.connects("bad-1"), "Mosquitto drops a truncated CRL on a SIGHUP")
    serial = uuid.uuid4().hex
    done = _cli(
        "fleet", "revoke", "--serial", serial, "--store", str(fleet.tmp / "store"),
        "--ca", str(fleet.tmp / "ca"), "--crl-file", str(fleet.crl),
        "--broker-pid", str(fleet.pid), "--broker", f"mqtts://127.0.0.1:{fleet.broker.port}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loop.json cannot be read" in done.stderr, done.stderr
    listed = read_disk_crl(fleet.ca, fleet.crl).entries
    assert int(serial, 16) in listed and fleet.bad_serial in listed
    _until(lambda: not fleet.connects("bad-1"), "bad-1 refused (broker signalled)")
    assert fleet.connects("good-1")


def test_broker_config_run_again_keeps_the_live_crl(fleet: Fleet) -> None:
    """Previous code: the CA's empty CRL replaced it (it verifies: nothing put it back), and
    bad-1 and the ledger of revoked devices were gone."""
    conf = fleet.crl.parent
    args = ("fleet", "broker-config", "--out", str(conf), "--ca", str(fleet.tmp / "ca"))
    live = fleet.crl.read_bytes()
    done = _cli(*args, "--port", str(free_port()))
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout and fleet.crl.read_bytes() == live
    assert "bad-1" in read_disk_crl(fleet.ca, fleet.crl).devices
    fleet.crl.write_bytes(b"garbage")  # one that does not verify: refused, left as it is
    done = _cli(*args)
    assert done.returncode != 0 and "last-good" in done.stderr, done.stderr
    assert fleet.crl.read_bytes() == b"garbage"
    new = fleet.tmp / "new-broker"  # none there: the CA's CRL, and its last good copy
    assert (
        _cli("fleet", "broker-config", "--out", str(new), "--ca", str(fleet.tmp / "ca")).returncode
        == 0
    )
    assert read_disk_crl(fleet.ca, new / "crl.pem").entries == {}
    assert last_good(new / "crl.pem").read_bytes() == (new / "crl.pem").read_bytes()


def test_the_crl_metric_reads_another_cas_crl_as_unreadable(fleet: Fleet) -> None:
    """Previous code: any parsable CRL's nextUpdate was served (30 days: no alert), though
    Mosquitto refuses every client on another CA's CRL."""
    init_ca(fleet.tmp / "other")
    other = FleetCA.load(fleet.tmp / "other")
    collector = IdentityCollector(EnrollmentService(fleet.ca, fleet.ids), crl_file=fleet.crl)
    assert collector.crl_left_s() > 29 * 86400
    fleet.crl.write_bytes(other.crl([], number=9))
    assert collector.crl_left_s() == 0.0


def test_fleet_identity_prints_a_planted_key_escaped(fleet: Fleet) -> None:
    """Previous code: the table printed the store's key raw, so a bucket writer's ESC sequence
    reached the operator's terminal (recoloured it here; a title or a hidden line elsewhere)."""
    devices = fleet.tmp / "store" / "fleet" / "identity" / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    (devices / "\x1b[31mPWNED.json").write_text("{}")
    for extra in ((), ("--ca", str(fleet.tmp / "ca"))):
        done = _cli("fleet", "identity", "--store", str(fleet.tmp / "store"), *extra)
        assert done.returncode == 0, done.stderr
        assert "PWNED" in done.stdout and "\x1b" not in done.stdout, repr(done.stdout)
        assert "\\x1b[31mPWNED" in done.stdout


def test_the_running_service_puts_back_an_older_crl_the_ca_signed(fleet: Fleet) -> None:
    """An older CRL the CA signed (a backup or snapshot restored, a local swap) put back over
    crl.pem after a revocation, and the broker reloaded (logrotate): the running service's
    check finds its CRLNumber below the last good copy's and puts that copy back. Previous
    code: it verifies, so it was kept until the next --crl-refresh (here 1 h, by default 24 h)
    and the revoked good-1 connected meanwhile (the wait below timed out)."""
    with _enroll_service(fleet, "1h") as (service, metrics, log):
        older = fleet.crl.read_bytes()
        good = load_cert((fleet.ids_dir / "good-1.crt").read_bytes())
        revoke_serial(fleet.ids, fleet.ca, good.serial_number, fleet.crl, fleet.pid, None)
        assert read_disk_crl(fleet.ca, fleet.crl).number > parse_crl(fleet.ca, older).number
        _until(lambda: not fleet.connects("good-1"), "good-1 refused once revoked")
        fleet.crl.write_bytes(older)
        os.kill(fleet.pid, signal.SIGHUP)
        _until(
            lambda: good.serial_number in read_disk_crl(fleet.ca, fleet.crl).entries,
            "the last good CRL put back over the older one by the running service",
        )
        _until(lambda: not fleet.connects("good-1"), "good-1 refused again (broker signalled)")
        assert last_good(fleet.crl).read_bytes() == fleet.crl.read_bytes()
        assert _restored(metrics) == 1.0
        assert "an older CRL put back" in log.read_text()
        assert not fleet.connects("bad-1")
        assert service.poll() is None, log.read_text()
