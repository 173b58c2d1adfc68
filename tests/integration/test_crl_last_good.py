"""A damaged CRL file on the broker's host, as Mosquitto 2.0.11 meets it: on a SIGHUP (every CRL
write, and Debian's daily logrotate of mosquitto.log) over a truncated, garbled, empty or missing
CRL it logs "Unable to load certificate revocation file" and runs on with no CRL check, so a
revoked certificate connects again (another CA's CRL shuts every client out instead). The
enrollment host's next CRL write (the service's refresh, or ``fleet revoke``) puts the last
good copy back and signals the broker: the revoked certificate is refused again, the others
still connect. On the previous code every writer refused to write over the damaged file, so
nothing put it right and the broker kept running without a CRL."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_sync.broker_config import BrokerTls
from cloud_sync.crl_disk import RESTORES, last_good, read_disk_crl
from cloud_sync.crl_publish import publish_crl
from cloud_sync.fleet_ca import FleetCA, init_ca, load_cert, tls_context
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import _connect, revoke_serial
from cloud_sync.store import open_store
from modelpack.errors import StoreError
from tests.support.services import Mosquitto

WAIT_S = 30.0


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {WAIT_S:.0f} s: {what}")
        time.sleep(0.1)


def test_a_damaged_crl_is_put_back_by_the_next_write_and_a_revoked_certificate_stays_out(
    tmp_path: Path,
) -> None:
    init_ca(tmp_path / "ca")
    init_ca(tmp_path / "other")
    ca, other = FleetCA.load(tmp_path / "ca"), FleetCA.load(tmp_path / "other")
    out = tmp_path / "ids"
    server = ca.issue_identity("broker", out, 30, ["127.0.0.1", "localhost"])
    good, bad = ca.issue_identity("good-1", out), ca.issue_identity("bad-1", out)
    bad_cert = load_cert(bad[0].read_bytes())
    crl = tmp_path / "broker" / "crl.pem"
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    revoked = {bad_cert.serial_number: bad_cert.not_valid_after_utc.timestamp()}
    publish_crl(ca, ids, crl, None, revoked, {"bad-1": time.time()}, first=True)
    tls = BrokerTls(ca.paths.bundle, server[0], server[1], crl)
    broker = Mosquitto(workdir=tmp_path / "mosquitto", tls=tls).start()
    assert broker.process is not None
    pid, address = broker.process.pid, ("127.0.0.1", broker.port)

    def connects(files: tuple[Path, Path]) -> bool:
        ctx = tls_context(ca.paths.bundle, *files)
        return _connect(ctx, f"p-{uuid.uuid4().hex[:8]}", *address, timeout=10)

    def refresh() -> None:  # enroll-service --crl-file, at its start and every --crl-refresh
        publish_crl(ca, ids, crl, pid, records=True)

    def revoke() -> None:  # fleet revoke --serial HEX --broker-pid PID --broker mqtts://...
        revoke_serial(ids, ca, int(uuid.uuid4().hex, 16), crl, pid, address)

    good_crl = crl.read_bytes()
    damages: dict[str, tuple[bytes | None, bool]] = {  # the bytes; whether bad-1 then gets in
        "truncated": (good_crl[: len(good_crl) // 2], True),
        "garbled": (os.urandom(600), True),
        "empty": (b"", True),
        "missing": (None, True),
        "another CA's": (other.crl([], number=9), False),
    }
    try:
        assert not connects(bad) and connects(good)
        for at, (name, (damage, bad_in)) in enumerate(damages.items()):
            if damage is None:
                crl.unlink()
            else:
                crl.write_bytes(damage)
            os.kill(pid, signal.SIGHUP)  # logrotate's postrotate: invoke-rc.d mosquitto reload
            if bad_in:
                _until(lambda: connects(bad), f"Mosquitto drops a {name} CRL on a SIGHUP")
            else:
                _until(lambda: not connects(good), f"Mosquitto refuses all on {name} CRL")
            restored = RESTORES[str(crl)]
            (refresh if at % 2 == 0 else revoke)()
            assert RESTORES[str(crl)] == restored + 1, name
            _until(lambda: not connects(bad), f"bad-1 refused again after a {name} CRL")
            assert connects(good), name
            disk = read_disk_crl(ca, crl)
            assert bad_cert.serial_number in disk.entries and "bad-1" in disk.devices, name
            assert last_good(crl).read_bytes() == crl.read_bytes(), name
            assert broker.process.poll() is None, name
        # A write that fails after the copy is back (the store unreachable) still signals the
        # broker: it runs on the last good CRL, not on none until the store returns.
        crl.write_bytes(b"")
        os.kill(pid, signal.SIGHUP)
        _until(lambda: connects(bad), "Mosquitto drops an empty CRL on a SIGHUP")
        (tmp_path / "not-a-store").write_text("a file where the store's directory should be")
        gone = IdentityStore(open_store(str(tmp_path / "not-a-store")), ca)
        with pytest.raises(StoreError):
            publish_crl(ca, gone, crl, pid)
        _until(lambda: not connects(bad), "bad-1 refused again though the write failed")
        assert connects(good)
    finally:
        broker.stop()
    # A cold start reads the CRL as written: bad-1 stays out.
    broker.start()
    try:
        assert not connects(bad) and connects(good)
    finally:
        broker.stop()
