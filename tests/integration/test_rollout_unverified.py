"""A rollout whose health checks could not be applied says so (issue 23, item 5): two real agents
serving no traffic, ``--canary 10 --waves 2 --wait --min-inferences 50``. The rollout stops after
the canary as ``unverified`` with exit code 3 (it used to end ``completed``, exit 0, with
``"figures": null``), says a line per step of the wave, and goes on only when resumed with
``--allow-unverified``, which it records."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.cli_run import run_cli
from tests.support.fleet import wait_versions
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow


def test_a_rollout_without_figures_stops_unverified_and_says_so(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    keys: tuple[Path, Path],
) -> None:
    fleet(["a", "b"])
    store_url = fleet.store_url  # type: ignore[attr-defined]
    base = [
        *("--store", store_url, "--broker", broker.url, "--prefix", topic_prefix),
        *("--key", str(keys[0]), "--lease-ttl", "5", "--json"),
        *("--bake", "1", "--wave-timeout", "15", "--wait"),  # an install in time under load
    ]
    run = run_cli(
        "rollout", "tiny", "2", *base, "--devices", "a,b", "--canary", "10", "--waves", "2"
    )
    assert run.returncode == 3, run.stderr
    shown = json.loads(run.stdout)
    assert shown["phase"] == "unverified"
    assert "canary (1/2) could not be judged in 16s" in shown["reason"]
    assert "0 of the 1 devices needed reported 50 inferences on v2" in shown["reason"]
    # The flag that sets the need, for a user whose devices had no traffic (issue 23 walk).
    assert "a device is judged once it served --min-inferences on v2" in shown["reason"]
    assert {d["device"]: d["state"] for d in shown["devices"]} == {"a": "done", "b": "pending"}
    (check,) = shown["checks"]
    assert check["verified"] is False and check["figures"]["reporting"] == 0
    assert shown["figures"] is not None and shown["figures"]["inferences"] == 0
    lines = [line for line in run.stderr.splitlines() if "canary (1/2): " in line]
    assert "pushed to 1 device(s)" in lines[0], run.stderr
    assert "1 of 1 on v2" in lines[-1] and "not verified" in lines[-1], run.stderr
    wait_versions(broker, topic_prefix, {"a": 2, "b": 1})  # the next wave was not pushed

    resumed = run_cli("rollout", "resume", shown["id"], *base, "--allow-unverified")
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads(resumed.stdout)
    assert done["phase"] == "completed"
    assert (
        "health not verified on canary (1/2), wave 1 (2/2) (--allow-unverified)" in (done["reason"])
    )
    assert [c["verified"] for c in done["checks"]] == [False, False]
    wait_versions(broker, topic_prefix, {"a": 2, "b": 2})
    status = run_cli("rollout", "status", shown["id"], "--store", store_url)
    assert "wave 1: NOT VERIFIED" in status.stdout, status.stdout


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--min-devices", "0"], "--min-devices: Input should be greater than or equal to 1"),
        (["--abort-device-share", "101"], "--abort-device-share: Input should be less than"),
        (["--max-device-rate", "0"], "--max-device-rate: Input should be greater than 0"),
        (["--wave-timeout", "-1"], "--wave-timeout: Input should be greater than 0"),
    ],
)
def test_a_threshold_that_cannot_work_is_one_line_naming_its_flag(
    flags: list[str], says: str, tmp_path: Path
) -> None:
    run = run_cli(
        *("rollout", "tiny", "2", "--store", str(tmp_path), "--broker", "mqtt://127.0.0.1:1"),
        *("--key", str(tmp_path / "signing.key"), "--devices", "a", *flags),
    )
    assert run.returncode == 1 and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
