"""When a device renews (issue 20 item 4): at two thirds of its certificate's life, spread by a
jitter of a few percent of that life, so that a fleet enrolled on one day does not renew in one
minute; a renewal that failed is tried again within a tenth of what is left."""

from __future__ import annotations

import time
from pathlib import Path

from cloud_sync.fleet_ca import FleetCA, cert_pem, init_ca, new_key
from edge_agent.config import AgentConfig
from edge_agent.identity import KeyMaker, Renewer
from edge_agent.identity_files import IdentityFiles, cert_window
from edge_agent.renewal_wait import LastWindow, backoff_s

LIFE_S = 300.0


def _renewer(tmp_path: Path) -> Renewer:
    init_ca(tmp_path / "ca")
    ca = FleetCA.load(tmp_path / "ca")
    key = new_key()
    cert = ca.sign_device_csr(KeyMaker().csr(key, "jit-a"), "jit-a", days=LIFE_S / 86400)
    files = IdentityFiles(tmp_path / "identity")
    files.dir.mkdir()
    files.cert.write_bytes(cert_pem(cert))
    config = AgentConfig(device="jit-a", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    # Only the schedule is under test: no channel, no thread.
    renewer = Renewer.__new__(Renewer)
    renewer.config, renewer.files, renewer._window = config, files, LastWindow(files.cert)
    return renewer


def test_renewal_is_due_at_two_thirds_of_the_life_with_jitter(tmp_path: Path) -> None:
    renewer = _renewer(tmp_path)
    not_before, not_after, _ = cert_window(renewer.files.cert)
    life = not_after - not_before
    target = not_before + 2 / 3 * life
    due = [time.time() + renewer.due_in() for _ in range(400)]
    assert all(abs(at - target) <= 0.03 * life + 1.0 for at in due)
    # Spread over most of the ±3 % window, not one instant for the whole fleet.
    assert max(due) - min(due) > 0.04 * life


def test_a_failed_renewal_is_retried_within_a_tenth_of_what_is_left(tmp_path: Path) -> None:
    renewer = _renewer(tmp_path)
    _, not_after, _ = cert_window(renewer.files.cert)
    now = time.time()
    cap = (not_after - now) / 10
    for failures in (1, 2, 4, 10):
        waits = [backoff_s(failures, now, not_after) for _ in range(100)]
        assert all(0 < wait <= cap + 0.01 for wait in waits), (failures, max(waits), cap)
    # Backoff: later tries wait longer, up to the cap.
    assert max(backoff_s(1, now, not_after) for _ in range(100)) <= cap / 4 + 0.01
