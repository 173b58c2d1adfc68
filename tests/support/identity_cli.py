"""The ``edgebento fleet ...`` commands in their own process, as an operator runs them against an
``IdentityFleet`` (its store, its CA, its mTLS broker with the operator's certificate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgebento.localports import PortTaken, free_port, wait_serving
from tests.support.identity_fleet import IdentityFleet

REPO = Path(__file__).resolve().parents[2]


def fleet_cli(*args: str | Path, env: dict[str, str] | None = None) -> str:
    """Its stdout; the command must succeed and print no key."""
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PRIVATE KEY" not in done.stdout + done.stderr  # keys are never printed
    return done.stdout


def as_operator(fleet: IdentityFleet) -> dict[str, str]:
    """The environment the cloud's commands (fleet status, sync) connect to the broker with."""
    cert, key = fleet.certs["operator"]
    return {
        "EDGEBENTO_MQTT_CA_FILE": str(fleet.ca.paths.bundle),
        "EDGEBENTO_MQTT_CERT_FILE": str(cert),
        "EDGEBENTO_MQTT_KEY_FILE": str(key),
    }


def start_enroll_service(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``edgebento fleet enroll-service ARGS`` in its own process, its stderr appended to
    ``log``, and the port of its /metrics once it serves (a new port when another process took
    the first between pick and bind)."""
    for _ in range(5):
        metrics = free_port()
        service = subprocess.Popen(
            [sys.executable, "-m", "edgebento", "fleet", "enroll-service", *args,
             "--metrics-port", str(metrics)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )  # fmt: skip
        try:
            wait_serving(service, [metrics], timeout=60)
        except PortTaken:
            continue
        except BaseException:
            service.kill()
            raise
        return service, metrics
    raise AssertionError("the enrollment service found its metrics port taken 5 times")
