"""``edgebento rollback`` against a real agent: it signs, the device verifies and goes back;
an instruction from a key the device does not trust is refused with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelpack import generate_keypair
from tests.support.agent import REPO, Client, wait_online
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow


def _rollback(
    broker: Mosquitto, prefix: str, key: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", "rollback", "--device", "dev-a", "--name", "tiny",
         "--version", "1", "--key", str(key), "--broker", broker.url, "--prefix", prefix,
         "--timeout", "30", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=90,
    )  # fmt: skip


def test_the_rollback_cli_signs_and_the_device_obeys_only_a_trusted_key(
    agent_factory: Any,
    client: Client,
    broker: Mosquitto,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v2)})["ok"]
    stranger, _ = generate_keypair(tmp_path / "stranger")
    refused = _rollback(broker, topic_prefix, stranger)
    assert refused.returncode == 1 and "not signed by any trusted key" in refused.stderr, (
        refused.stderr
    )
    done = _rollback(broker, topic_prefix, keys[0])
    assert done.returncode == 0, done.stderr
    assert '"outcome": "rolled_back"' in done.stdout
    reply = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [[0.5] * 8]}})
    assert reply["model"] == {"name": "tiny", "version": 1}
