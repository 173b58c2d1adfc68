"""Two processes writing one CRL at once, as the enrollment service's refresh (every
``--crl-refresh``) and an operator's ``fleet revoke`` do: every revocation either wrote is in the
CRL the broker reads, and neither fails. Both used to share one temporary file (one renamed the
other's half-written bytes, the other's rename found nothing: FileNotFoundError, which ends the
service) and each wrote what it had read before the other's write (a revocation gone from the
CRL: a revoked device could connect again, and ``fleet revoke``'s probe was never refused)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cloud_sync.fleet_ca import FleetCA, init_ca
from tests.support.agent import REPO

WRITES = 60  # each: enough that the two overlap many times, a few seconds in all

# Ready once imported and loaded, then it writes at the word go: the two overlap from the first.
WRITER = """
import sys
import time
from pathlib import Path
from cloud_sync.fleet_ca import FleetCA
from cloud_sync.identity_store import IdentityStore
from cloud_sync.crl_publish import publish_crl
from cloud_sync.store import open_store

root, first, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ca = FleetCA.load(root / "ca")
ids = IdentityStore(open_store(str(root / "store")), ca)
print("ready", flush=True)
sys.stdin.readline()
for serial in range(first, first + count):
    publish_crl(ca, ids, root / "broker" / "crl.pem", None, extra={serial: time.time() + 86400})
"""


def test_two_writers_of_the_crl_lose_no_revocation(tmp_path: Path) -> None:
    from cryptography import x509

    paths = init_ca(tmp_path / "ca")
    (tmp_path / "broker").mkdir()  # the CRL the broker reads, as broker-config writes it
    (tmp_path / "broker" / "crl.pem").write_bytes(paths.crl.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    firsts = (1000, 2000)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(first), str(WRITES)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in firsts
    ]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    crl = x509.load_pem_x509_crl((tmp_path / "broker" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(FleetCA.load(tmp_path / "ca").cert.public_key())
    listed = {entry.serial_number for entry in crl}
    wanted = {first + i for first in firsts for i in range(WRITES)}
    assert sorted(wanted - listed) == []
    # What each wrote through its own temporary file: nothing of them is left beside the CRL.
    assert sorted(p.name for p in (tmp_path / "broker").iterdir() if p.suffix == ".tmp") == []
