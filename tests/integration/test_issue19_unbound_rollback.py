"""Issue 19, finding 5: a rollback instruction that names no version it leaves cannot undo a
later install (real agent, real Mosquitto).

Such an instruction (``edgebento rollback --print`` without ``--leaves``, or signed for a device
whose status named no model) was taken by a device whatever it ran when it arrived, as long as
its generation was unspent: captured before the device installed v2, it took the device back
to v1 afterwards. Now only a device that runs no model takes one; a bound one still works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import Client, rollback_authorization, wait_online

pytestmark = pytest.mark.slow
X = [[0.5] * 8]


def _served(client: Client, prefix: str) -> int:
    answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}})
    assert answer["ok"] is True, answer
    return int(answer["model"]["version"])


def test_an_unbound_rollback_signed_before_an_install_cannot_undo_it(
    agent_factory: Any, client: Client, pack_v1: Path, pack_v2: Path,
    topic_prefix: str, keys: tuple[Path, Path],
) -> None:  # fmt: skip
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    # Signed while the device ran v1 (its status unknown to the signer), never delivered.
    captured = rollback_authorization(keys[0], "dev-a", "tiny", 1, generation=5)
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v2)})["ok"]
    assert _served(client, topic_prefix) == 2
    cmd = f"{topic_prefix}/dev-a/cmd/rollback"
    reply = client.request(cmd, {"authorization": captured})
    assert reply["ok"] is False, reply
    assert "names no version it leaves, and this device runs tiny v2" in reply["error"]
    assert _served(client, topic_prefix) == 2
    # The operator's instruction bound to what the device runs goes through.
    bound = rollback_authorization(keys[0], "dev-a", "tiny", 1, generation=6, leaves=2)
    back = client.request(cmd, {"authorization": bound})
    assert back["ok"] is True and back["outcome"] == "rolled_back", back
    assert _served(client, topic_prefix) == 1
