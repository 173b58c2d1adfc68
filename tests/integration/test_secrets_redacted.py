"""A broker password never reaches the console (issue 19, finding 10), through the real
``edgebento simulate`` and ``edgebento fleet status`` processes and a real Mosquitto.

On main ``simulate`` printed ``mqtt://fleetop:Sup3rSecret@…`` whole, and a password holding a
quote, ``<``, ``>`` or a space (all of which the URL parser accepts) was never redacted."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import quote

import pytest

from tests.support.services import Mosquitto

PASSWORDS = ["Sup3rSecret", 'it\'s <a> "secret"', "sp ace>pass"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_simulate_and_fleet_status_never_print_the_password(
    broker: Mosquitto, topic_prefix: str, password: str
) -> None:
    url = f"mqtt://fleetop:{password}@127.0.0.1:{broker.port}"
    edgebento = [sys.executable, "-m", "edgebento"]
    sim = subprocess.run(
        [*edgebento, "simulate", "--devices", "2", "--broker", url, "--prefix", topic_prefix,
         "--duration", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert "ready: 2 devices on mqtt://fleetop:***@127.0.0.1" in sim.stdout
    status = subprocess.run(
        [*edgebento, "-v", "fleet", "status", "--broker", url, "--prefix", topic_prefix,
         "--listen", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr[-2000:]
    for out in (sim.stdout, sim.stderr, status.stdout, status.stderr):
        assert password not in out and quote(password, safe="") not in out, out[-2000:]
