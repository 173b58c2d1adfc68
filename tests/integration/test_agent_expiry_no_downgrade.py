"""Expiry never becomes a downgrade (issue 19, finding 7).

On main, with ``refuse_expired = true``, an installed v6 that expired made the device fall back
at its next boot to the earlier pack it kept (v1, below its high-water mark of 6): withholding
updates until a pack expired was a rollback. Here a real agent serves nothing instead, says why
in its status and log, raises ``edgebento_model_expired``, and takes a newer pack when one comes;
a pack that expires while the agent runs stops serving at its next heartbeat, without a restart.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from tests.support.agent import Client, expiring_pack, make_pack, wait_for
from tests.support.services import free_port

X = [[0.1, -0.2, 0.3, 0.05, -0.4, 0.2, 0.0, 0.3]]


class Refusing:
    """A real agent with ``refuse_expired = true`` and metrics, serving v1, then an installed v6
    that has expired since (``expire_v6``)."""

    def __init__(
        self, agent_factory: Any, client: Client, pack_v1: Path, prefix: str, tmp_path: Path
    ) -> None:
        config = tmp_path / "agent.toml"
        config.write_text("refuse_expired = true\n")
        self.client, self.prefix, self.port = client, prefix, free_port()
        self.args = ("--config", str(config), "--metrics-port", str(self.port))
        self.statuses = client.collect(f"{prefix}/dev-a/status")
        self.agent = agent_factory(pack=pack_v1, args=self.args)
        wait_for(
            self.statuses, lambda d: (d.get("model") or {}).get("version") == 1, 90, self.agent
        )

    def expire_v6(self, mlp_model: Path, key: Path, out: Path) -> None:
        def deploy(v6: Path) -> bool:
            reply = self.client.request(f"{self.prefix}/dev-a/cmd/deploy", {"url": str(v6)})
            assert reply["ok"] or "expired at" in reply["error"], reply
            return bool(reply["ok"])

        expiring_pack(out, mlp_model, key, 6, deploy)

    def serves_nothing_then_v7(self, mlp_model: Path, key: Path, out: Path) -> None:
        """No model answers, the metric says why, and a newer pack is the way out."""
        prefix, client = self.prefix, self.client
        answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}})
        assert answer["ok"] is False and answer.get("reason") == "not_ready", answer
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode()
        assert "edgebento_model_expired 1.0" in metrics
        v7 = make_pack(out, mlp_model, key, 7)
        assert client.request(f"{prefix}/dev-a/cmd/deploy", {"url": str(v7)})["ok"] is True
        answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}})
        assert answer["model"] == {"name": "tiny", "version": 7}, answer


def test_an_expired_pack_stops_serving_and_nothing_older_takes_its_place(
    agent_factory: Any, client: Client, mlp_model: Path, keys: tuple[Path, Path],
    pack_v1: Path, topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    device = Refusing(agent_factory, client, pack_v1, topic_prefix, tmp_path)
    statuses, args, agent = device.statuses, device.args, device.agent
    device.expire_v6(mlp_model, keys[0], tmp_path / "v6")  # and it expired since
    assert agent.stop() == 0
    agent = agent_factory(pack=pack_v1, args=args)  # its --pack is v1 too: still not served
    status = wait_for(
        statuses,
        lambda d: d.get("state") == "online" and d.get("boot_id") and d.get("model") is None,
        90,
        agent,
    )
    assert status["expired"] is True
    assert status["last_update"]["outcome"] == "refused"
    assert "would be a downgrade" in status["last_update"]["message"]
    assert "expired" in agent.output() and "downgrade" in agent.output()
    device.serves_nothing_then_v7(mlp_model, keys[0], tmp_path / "v7")


def test_a_pack_that_expires_while_serving_stops_serving_without_a_restart(
    agent_factory: Any, client: Client, mlp_model: Path, keys: tuple[Path, Path],
    pack_v1: Path, topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Before, the rule held only at boot: a device up for months served an expired pack for as
    long as it ran. Now it stops at the agent's next heartbeat."""
    device = Refusing(agent_factory, client, pack_v1, topic_prefix, tmp_path)
    device.expire_v6(mlp_model, keys[0], tmp_path / "v6")
    status = wait_for(
        device.statuses, lambda d: d.get("model") is None and d.get("expired") is True, 60
    )
    update = status["last_update"]
    assert (update["outcome"], update["trigger"]) == ("refused", "expiry")
    assert "would be a downgrade" in update["message"]
    assert device.agent.process.poll() is None  # still running: only the model stopped
    device.serves_nothing_then_v7(mlp_model, keys[0], tmp_path / "v7")
