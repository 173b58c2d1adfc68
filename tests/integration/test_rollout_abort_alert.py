"""EdgebentoRolloutAborted fires for an abort its controller was never scraped in: the demo's
broken rollout aborted between two scrapes and its controller exited at once, so the alert stayed
inactive. A real ``edgebento sync`` reads the outcome from the store, and the real Prometheus,
with the repository's rules, fires the alert on it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.rollout_state import Thresholds, new_rollout
from cloud_sync.rollout_store import save_state
from cloud_sync.store import open_store
from edgebento.localservices import LOOPBACK, Prometheus, free_port
from tests.support.services import Mosquitto, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _rollout(store_dir: Path, version: int, phase: str) -> str:
    store = open_store(str(store_dir))
    state = new_rollout("digits", version, ["dev-1", "dev-2"], {}, Thresholds(), "edgebento")
    state.phase = phase  # type: ignore[assignment]
    save_state(store, state, Ed25519PrivateKey.generate())
    return state.id


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_an_abort_no_scrape_of_its_controller_saw_fires_the_alert(
    broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    aborted = _rollout(store, 3, "aborted")
    running = _rollout(store, 4, "running")
    port = free_port()
    sync = subprocess.Popen(
        [
            str(BIN / "edgebento"),
            "sync",
            "--broker",
            broker.url,
            "--store",
            str(store),
            "--metrics-port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sync.log").open("wb"),
    )
    prometheus = Prometheus(
        tmp_path / "prometheus", {"edgebento-sync": [(f"{LOOPBACK}:{port}", {})]}
    )
    try:
        wait_for_port(port)
        text = _metrics(port)
        assert (
            f'edgebento_rollout_ended_timestamp_seconds{{phase="aborted",rollout="{aborted}"}}'
            in text
        ), text[-2000:]
        assert running not in text  # still running: the controller's own gauge says so
        prometheus.start()
        prometheus.wait_scraped()  # its API answers 503 until it has loaded its storage
        deadline = time.monotonic() + 60
        while prometheus.alerts().get("EdgebentoRolloutAborted") != "firing":
            assert time.monotonic() < deadline, prometheus.alerts()
            time.sleep(0.5)
        assert not prometheus.unhealthy_rules()
        firing = prometheus.query('ALERTS{alertname="EdgebentoRolloutAborted",alertstate="firing"}')
        assert [s["metric"]["rollout"] for s in firing] == [aborted]
    finally:
        prometheus.stop()
        sync.terminate()
        sync.wait(timeout=20)
