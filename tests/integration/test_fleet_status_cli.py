"""``fleet status``, ``rollout list`` and ``rollout status`` as a user runs them, piped, against
simulated devices (``edgebento simulate``) on a real Mosquitto: a healthy device never looks
stale, and no identifier is cut (issue 23, item 7)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli_run import run_cli
from tests.support.services import Mosquitto
from tests.support.sim import Simulated, publish_v1_v2, wait_for

pytestmark = pytest.mark.slow
LONG_ID = "warehouse-north-entrance-camera-{:04d}"  # wider than a table at 80 columns allows


@pytest.fixture
def long_named(broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path], tmp_path: Path) -> Iterator[list[str]]:  # fmt: skip
    """Three simulated devices with long ids, an inference window every 4 s."""
    sim = Simulated(
        broker, topic_prefix, keys[1], tmp_path / "sim.log", 3, 0,
        ("--id", LONG_ID, "--telemetry-s", "4"),
    ).start()  # fmt: skip
    yield [LONG_ID.format(i) for i in range(3)]
    sim.stop()


def test_a_healthy_device_never_looks_stale_and_its_id_is_whole(
    long_named: list[str], broker: Mosquitto, topic_prefix: str
) -> None:
    time.sleep(7)  # the retained statuses, written at connect, are older than a window now
    base = ["fleet", "status", "--broker", broker.url, "--prefix", topic_prefix]
    seen: list[str] = []
    for _ in range(3):  # a 0.5 s listen misses most 4 s windows: each run must still be right
        run = run_cli(*base, "--listen", "0.5")
        assert run.returncode == 0, run.stderr
        lines = {line.split()[0]: line for line in run.stdout.splitlines()[2:]}
        assert sorted(lines) == long_named, run.stdout  # whole ids, one row each
        for device in long_named:
            last = re.search(r"v1\s+(connected|\d+s ago|\d+m ago)", lines[device])
            assert last is not None, lines[device]
            seen.append(last.group(1))
    for shown in seen:  # the device heartbeats every 4 s: never older than a window
        assert shown == "connected" or int(shown.removesuffix("s ago")) <= 5, seen
    as_json = json.loads(run_cli(*base, "--listen", "0.5", "--json").stdout)["devices"]
    assert {as_json[d]["heard"] for d in long_named} <= {"connected", "live"}


def test_rollout_list_and_status_keep_ids_whole_and_take_json(
    long_named: list[str],
    broker: Mosquitto,
    topic_prefix: str,
    keys: tuple[Path, Path],
    tmp_path: Path,
    mlp_model: Path,
) -> None:
    store = str(tmp_path / "store")
    publish_v1_v2(store, tmp_path, mlp_model, keys[0])
    flags = [
        *("--store", store, "--broker", broker.url, "--prefix", topic_prefix),
        *("--key", str(keys[0]), "--devices", ",".join(long_named), "--bake", "0"),
        *("--canary", "100", "--allow-unverified", "--json"),
    ]
    run = run_cli("rollout", "tiny", "2", *flags)
    assert run.returncode == 0, run.stderr
    rollout_id = json.loads(run.stdout)["id"]
    wait_for(broker, topic_prefix, dict.fromkeys(long_named, 2))

    listed = run_cli("rollout", "list", "--store", store)
    assert listed.returncode == 0, listed.stderr
    assert rollout_id in listed.stdout.split(), listed.stdout  # whole, so resume can take it
    as_json = json.loads(run_cli("rollout", "list", "--store", store, "--json").stdout)
    assert [r["id"] for r in as_json["rollouts"]] == [rollout_id]
    assert as_json["rollouts"][0]["phase"] == "completed"

    shown = run_cli("rollout", "status", rollout_id, "--store", store)
    assert shown.returncode == 0, shown.stderr
    assert rollout_id in shown.stdout.split()
    assert {line.split()[0] for line in shown.stdout.splitlines()[2:5]} == set(long_named)
