"""Expiry never becomes a downgrade (issue 19, finding 7).

On main, with ``refuse_expired = true``, an installed v6 that expired made the device fall back
at its next boot to the earlier pack it kept (v1, below its high-water mark of 6): withholding
updates until a pack expired was a rollback. Here a real agent serves nothing instead, says why
in its status and log, raises ``edgebento_model_expired``, and takes a newer pack when one comes.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from tests.support.agent import Client, expiring_pack, make_pack, wait_for
from tests.support.services import free_port

X = [[0.1, -0.2, 0.3, 0.05, -0.4, 0.2, 0.0, 0.3]]


def test_an_expired_pack_stops_serving_and_nothing_older_takes_its_place(
    agent_factory: Any, client: Client, mlp_model: Path, keys: tuple[Path, Path],
    pack_v1: Path, topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    config = tmp_path / "agent.toml"
    config.write_text("refuse_expired = true\n")
    port = free_port()
    args = ("--config", str(config), "--metrics-port", str(port))
    statuses = client.collect(f"{topic_prefix}/dev-a/status")
    agent = agent_factory(pack=pack_v1, args=args)
    wait_for(statuses, lambda d: (d.get("model") or {}).get("version") == 1)

    def deploy(v6: Path) -> bool:
        reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(v6)})
        assert reply["ok"] or "expired at" in reply["error"], reply
        return bool(reply["ok"])

    expiring_pack(tmp_path / "v6", mlp_model, keys[0], 6, deploy)  # and it expired since
    assert agent.stop() == 0
    agent = agent_factory(pack=pack_v1, args=args)  # its --pack is v1 too: still not served
    status = wait_for(
        statuses,
        lambda d: d.get("state") == "online" and d.get("boot_id") and d.get("model") is None,
    )
    assert status["expired"] is True
    assert status["last_update"]["outcome"] == "refused"
    assert "would be a downgrade" in status["last_update"]["message"]
    answer = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})
    assert answer["ok"] is False and answer.get("reason") == "not_ready", answer
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert "edgebento_model_expired 1.0" in metrics
    assert "expired" in agent.output() and "downgrade" in agent.output()
    # A newer pack is the way out.
    v7 = make_pack(tmp_path / "v7", mlp_model, keys[0], 7)
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(v7)})["ok"] is True
    assert client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["model"] == {
        "name": "tiny",
        "version": 7,
    }
