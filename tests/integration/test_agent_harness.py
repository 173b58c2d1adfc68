"""The harness's basic promise: the agent comes online with its --pack, and a clean stop leaves
an offline status behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.agent import Client, wait_for, wait_online


def test_agent_comes_online_with_its_pack_and_goes_offline_on_stop(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent = agent_factory(pack=pack_v1)
    online = wait_online(client, topic_prefix, "dev-a", version=1)
    assert online["model"] == {"name": "tiny", "version": 1}
    status = client.collect(f"{topic_prefix}/dev-a/status")
    assert agent.stop() == 0
    offline = wait_for(status, lambda d: d.get("state") == "offline")
    assert offline["device"] == "dev-a"
