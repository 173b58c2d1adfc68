"""``edgebento rollback`` leaves the fleet's desired state consistent with what it did (issue 23,
item 6): a real agent, updated to v2 by a retained desired state as a rollout sets it, is sent
back to v1 by the CLI; ``fleet status`` then shows nothing pending, and after a restart the
agent refuses nothing. A later desired v2 is refused with a message naming what runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.protocol import Desired, ModelRef, Topics
from cloud_sync.watch import FleetWatch
from tests.support.agent import Client, wait_for, wait_online
from tests.support.cli_run import run_cli
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow


def _applied(client: Client, prefix: str, generation: int) -> dict[str, Any]:
    """The device's status once it echoes what it did with desired ``generation``."""
    return wait_for(
        client.collect(f"{prefix}/dev-a/status"),
        lambda d: (
            d.get("state") == "online" and (d.get("applied") or {}).get("generation") == generation
        ),
        30,
    )


def test_a_rollback_sets_the_desired_state_it_leaves_behind(
    agent_factory: Any,
    client: Client,
    broker: Mosquitto,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    keys: tuple[Path, Path],
) -> None:
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a", version=1)
    topics = Topics(topic_prefix)
    v2 = Desired(model=ModelRef(name="tiny", version=2), url=str(pack_v2), rollout="r1")
    with FleetWatch(broker.url, topics, {"dev-a"}) as watch:
        watch.set_desired("dev-a", v2.model_copy(update={"generation": 7}))
    assert _applied(client, topic_prefix, 7)["model"]["version"] == 2

    rollback = ["rollback", "--device", "dev-a", "--name", "tiny", "--version", "1"]
    rollback += ["--key", str(keys[0]), "--prefix", topic_prefix, "--timeout", "30"]
    missing = run_cli(*rollback)  # no --broker: one line that says what to give
    assert missing.returncode == 1 and "--broker mqtt://host:port is needed" in missing.stderr

    done = run_cli(*rollback, "--broker", broker.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "rolled_back"
    assert "set the desired state of dev-a: tiny v1 (generation 8" in done.stderr
    status = _applied(client, topic_prefix, 8)  # it acted on the new desired state: nothing to do
    assert status["applied"]["outcome"] == "installed" and status["model"]["version"] == 1

    fleet = ["fleet", "status", "--broker", broker.url, "--prefix", topic_prefix, "--json"]
    shown = json.loads(run_cli(*fleet, "--listen", "0.5").stdout)["devices"]["dev-a"]
    assert (shown["version"], shown["desired_version"], shown["pending_update"]) == (1, 1, False)

    assert agent.stop() == 0
    agent.start()  # reconciles the retained desired state again, as at every boot
    status = _applied(client, topic_prefix, 8)
    assert status["model"]["version"] == 1 and status["applied"]["outcome"] == "installed"
    assert (status.get("last_update") or {}).get("outcome") != "refused", status

    # An operator who sets v2 again is refused, and the message names what runs.
    with FleetWatch(broker.url, topics, {"dev-a"}) as watch:
        watch.set_desired("dev-a", v2.model_copy(update={"generation": 9}))
    refused = _applied(client, topic_prefix, 9)["applied"]
    assert refused["outcome"] == "refused"
    assert "not above v2, the highest this device installed (it runs v1)" in refused["reason"]
