"""The agent as deploy/systemd/edge-agent.service starts it (``python -OO``, two malloc arenas),
with its signatures checked in a child process: it serves, installs a signed update, and refuses
a pack signed by a key it does not trust and one whose model was changed after signing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from modelpack import MODEL_FILE, generate_keypair
from tests.support.agent import Client, make_pack, wait_online

X = [[0.5] * 8]
AS_SHIPPED = {"PYTHONOPTIMIZE": "2", "MALLOC_ARENA_MAX": "2"}  # PYTHONOPTIMIZE=2 is -OO


def test_the_agent_as_shipped_verifies_in_a_child(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    mlp_model: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    agent_factory(pack=pack_v1, env=AS_SHIPPED)
    # Without cached -OO bytecode the agent compiles every module first: a slow start here.
    wait_online(client, topic_prefix, "dev-a", version=1, timeout=120)
    deploy, infer = f"{topic_prefix}/dev-a/cmd/deploy", f"{topic_prefix}/dev-a/infer"

    stranger, _ = generate_keypair(tmp_path / "stranger")
    foreign = make_pack(tmp_path / "foreign", mlp_model, stranger, 3)
    refused = client.request(deploy, {"url": str(foreign)}, timeout=60)
    assert refused["ok"] is False and "trusted key" in refused["error"]

    changed = tmp_path / "changed"
    shutil.copytree(pack_v2, changed)
    model = changed / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    refused = client.request(deploy, {"url": str(changed)}, timeout=60)
    assert refused["ok"] is False and MODEL_FILE in refused["error"]
    assert client.request(infer, {"inputs": {"x": X}})["model"]["version"] == 1

    assert client.request(deploy, {"url": str(pack_v2)}, timeout=60)["ok"] is True
    answer = client.request(infer, {"inputs": {"x": X}})
    assert answer["ok"] is True and answer["model"]["version"] == 2
