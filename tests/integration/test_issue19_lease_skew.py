"""Issue 19, finding 8, through real controllers: ``edgebento rollout`` processes whose wall
clocks are skewed by ±120 s share one fleet lease in moto's S3 (conditional writes through real
boto3 calls), with a simulated fleet on a real Mosquitto.

On the old lease a controller 120 s ahead took a live lease (its holder lost it while running),
and one 120 s behind could not take over from a stopped holder for two minutes, so a resume
gave up. Now a challenger decides on what it watched of the lease on its own monotonic clock,
and the holder that was taken over cannot write again (its next renewal is a conditional write
on an etag that changed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.lease import lease_key
from cloud_sync.rollout_store import load_state
from cloud_sync.sealed import public_of
from cloud_sync.store import ObjectStore, open_store
from modelpack.errors import NotFoundError
from modelpack.signing import load_private_key
from tests.support.fleet import rollout_ids
from tests.support.services import Mosquitto, MotoS3
from tests.support.sim import REPO, publish_v1_v2

pytestmark = pytest.mark.slow

# The CLI with this process's wall clock moved by argv[1] seconds; monotonic time is the host's.
SKEWED = """
import sys, time
real, skew = time.time, float(sys.argv.pop(1))
time.time = lambda: real() + skew
from edgebento.cli import main
sys.exit(main())
"""


@pytest.fixture
def s3_fleet(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path, mlp_model: Path,
    keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> str:  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    url = f"s3://{s3_bucket}/fleet"
    publish_v1_v2(url, tmp_path, mlp_model, keys[0])
    return url


class Controller:
    """``edgebento rollout ...`` in its own process, its wall clock ``skew`` seconds off."""

    def __init__(self, skew: float, args: list[str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-c", SKEWED, str(skew), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
        )

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            self.process.terminate()
            try:
                self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


@pytest.fixture
def controllers() -> Iterator[list[Controller]]:
    started: list[Controller] = []
    yield started
    for controller in started:
        controller.stop()


def _lease(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """The lease document as stored (empty before one is written)."""
    try:
        doc = json.loads(store.get_bytes(lease_key(prefix)))
    except NotFoundError:
        return {}
    return {"generation": 1, "renewals": 0, "released": False, **doc}


def _until(what: str, ok: object, controller: Controller, timeout: float = 60) -> None:
    """Poll ``ok()`` (a real state: the store, the broker) until true; the log on failure."""
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        assert controller.process.poll() is None, f"exited before {what}: {controller.text()}"
        assert time.monotonic() < deadline, f"no {what}: {controller.text()}"
        time.sleep(0.2)


def _rollout_args(store_url: str, broker: Mosquitto, prefix: str, key: Path, ttl: float) -> list:
    return [
        *("rollout", "tiny", "2", "--store", store_url, "--broker", broker.url),
        *("--prefix", prefix, "--key", str(key), "--lease-ttl", str(ttl), "--json"),
        *("--canary", "50", "--waves", "1", "--bake", "60", "--wave-timeout", "30"),
        "--allow-unverified",  # no traffic: the bake only holds the lease
    ]


def test_a_controller_120s_ahead_cannot_take_a_live_lease(
    simulate, s3_fleet: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, controllers: list[Controller],
) -> None:  # fmt: skip
    fleet = simulate(2)
    store = open_store(s3_fleet)
    args = [*_rollout_args(s3_fleet, broker, topic_prefix, keys[0], 10), "--devices"]
    holder = Controller(0, [*args, ",".join(fleet.names)], tmp_path / "holder.log")
    controllers.append(holder)
    _until("rollout in the store", lambda: rollout_ids(s3_fleet), holder)
    (rollout,) = rollout_ids(s3_fleet)
    _until("held lease", lambda: _lease(store, topic_prefix).get("released") is False, holder)
    held = _lease(store, topic_prefix)

    ahead = Controller(120, [*args, ",".join(fleet.names)], tmp_path / "ahead.log")
    controllers.append(ahead)
    code, _ = ahead.finish()
    assert code == 1 and f"is leased to rollout {held['rollout']}" in ahead.text(), ahead.text()
    # The holder never lost it: still running, the lease its own, never taken over.
    now = _lease(store, topic_prefix)
    assert holder.process.poll() is None, holder.text()
    assert (now["holder"], now["generation"]) == (held["holder"], held["generation"])
    assert not now["released"] and now["renewals"] > held["renewals"]
    assert rollout_ids(s3_fleet) == [rollout]  # the challenger planned nothing
    assert "lost the lease" not in holder.text()


def test_a_controller_120s_behind_takes_over_a_stopped_holder_which_can_then_write_nothing(
    simulate, s3_fleet: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, controllers: list[Controller],
) -> None:  # fmt: skip
    fleet = simulate(2)
    store = open_store(s3_fleet)
    args = _rollout_args(s3_fleet, broker, topic_prefix, keys[0], 3)
    holder = Controller(0, [*args, "--devices", ",".join(fleet.names)], tmp_path / "holder.log")
    controllers.append(holder)
    _until("rollout in the store", lambda: rollout_ids(s3_fleet), holder)
    (rollout,) = rollout_ids(s3_fleet)
    _until("canary on v2", lambda: load_state(store, rollout).count("done") >= 1, holder, 90)
    first = _lease(store, topic_prefix)
    assert first["generation"] == 1
    holder.process.send_signal(signal.SIGSTOP)  # hung, or its host paused: it renews no more
    header = f"rollouts/{rollout}.json"
    stopped_at = store.get_bytes(header)  # a stopped process writes nothing after this

    resume = ["rollout", "resume", rollout, "--store", s3_fleet, "--broker", broker.url]
    resume += ["--key", str(keys[0]), "--lease-ttl", "3", "--json"]
    behind = Controller(-120, resume, tmp_path / "behind.log")
    controllers.append(behind)
    _until("takeover", lambda: _lease(store, topic_prefix)["generation"] == 2, behind)
    taken = _lease(store, topic_prefix)
    assert taken["holder"] != first["holder"] and not taken["released"]
    # The resumed controller saves the state under its lease before it publishes anything.
    _until("a save by the resume", lambda: store.get_bytes(header) != stopped_at, behind)

    holder.process.send_signal(signal.SIGCONT)
    code, _ = holder.finish(timeout=60)
    assert code == 1, holder.text()
    errors = [line for line in holder.text().splitlines() if '"error"' in line or "error:" in line]
    assert errors and any(
        "lost the lease" in line or "written by someone else" in line for line in errors
    ), holder.text()
    # What the stale holder could not write: the lease and the state are the successor's.
    after = _lease(store, topic_prefix)
    assert (after["holder"], after["generation"]) == (taken["holder"], 2)
    state = load_state(store, rollout, public_of(load_private_key(keys[0])))
    assert state.phase == "running", state.phase
    assert behind.process.poll() is None, behind.text()  # the successor carries on
