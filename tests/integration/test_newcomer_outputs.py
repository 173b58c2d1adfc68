"""What a newcomer reads back from the CLI and the agent says what happened (issue 23): the key
that signed a pack, the model a pack was made from, a publish that changed nothing, the
version, `sync`'s store from the environment, refusals with an `error_type`, and a log line for
every install, rollback and shutdown. Each through the real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from modelpack import generate_keypair
from tests.support.agent import AgentProcess, Client, make_pack, wait_online
from tests.support.services import Mosquitto


def edgebento(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
    )


def test_version_is_the_installed_distributions() -> None:
    done = edgebento("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"edgebento {version('edgebento')}"
    agent = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--version"], capture_output=True, text=True
    )
    assert agent.stdout.strip() == f"edge-agent {version('edgebento')}"


def test_pack_inspect_says_which_key_signed(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    _, other = generate_keypair(tmp_path / "other")
    from modelpack.signing import load_public_key

    key_id = load_public_key(keys[1]).key_id
    by_key = edgebento("pack", "inspect", signed_pack, "--pub", other, "--pub", keys[1])
    assert by_key.returncode == 0, by_key.stderr
    assert f"by key {key_id}" in by_key.stdout
    not_ours = edgebento("pack", "inspect", signed_pack, "--pub", other)
    assert "by none of the --pub keys" in not_ours.stdout
    no_key = edgebento("pack", "inspect", signed_pack)
    assert "add --pub KEY" in no_key.stdout


def test_the_parent_is_the_source_models_hash(mlp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "pack"
    done = edgebento(
        "optimize", mlp_model, "--out", out, "--name", "m", "--version", "1",
        "--quantize", "off", "--prune", "off", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent = json.loads((out / "manifest.json").read_text())["parent"]
    assert parent == hashlib.sha256(mlp_model.read_bytes()).hexdigest()
    # --quantize off keeps FP32, and a FP32 pick packs the source as given, byte for byte.
    assert (out / "model.onnx").read_bytes() == mlp_model.read_bytes()


def test_publishing_the_same_bytes_again_says_so(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = edgebento("publish", signed_pack, "--store", store, "--trust", keys[1], "--no-channel")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("published tiny v1"), first.stdout
    again = edgebento("publish", signed_pack, "--store", store, "--trust", keys[1], "--no-channel")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already published: tiny v1 with the same bytes"), again.stdout
    assert "nothing uploaded" in again.stdout


def test_sync_takes_its_store_from_the_environment(broker: Mosquitto, tmp_path: Path) -> None:
    store = tmp_path / "telemetry-store"
    log = tmp_path / "sync.log"
    with log.open("w") as err:
        sync = subprocess.Popen(
            [sys.executable, "-m", "edgebento", "sync", "--broker", broker.url],
            env={**os.environ, "EDGEBENTO_STORE": str(store)},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while "syncing telemetry" not in log.read_text() and time.monotonic() < deadline:
            assert sync.poll() is None, log.read_text()
            time.sleep(0.2)
        assert str(store) in log.read_text()
    finally:
        sync.send_signal(signal.SIGTERM)
        sync.wait(30)


def test_the_agent_logs_installs_rollbacks_refusals_and_its_shutdown(
    broker: Mosquitto,
    tmp_path: Path,
    keys: tuple[Path, Path],
    mlp_model: Path,
    topic_prefix: str,
) -> None:
    v1 = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
    v2 = make_pack(tmp_path / "v2", mlp_model, keys[0], 2)
    agent = AgentProcess(broker, tmp_path / "agent", keys[1], topic_prefix, "cam-1").start()
    client = Client(broker)
    try:
        wait_online(client, topic_prefix, "cam-1")
        assert "serving no model yet" in agent.output()
        assert f"{topic_prefix}/cam-1/cmd/deploy" in agent.output()  # how to install one
        cmd = f"{topic_prefix}/cam-1/cmd"
        assert client.request(f"{cmd}/deploy", {"url": str(v1)})["outcome"] == "installed"
        assert client.request(f"{cmd}/deploy", {"url": str(v2)})["outcome"] == "installed"
        back = edgebento(
            "rollback", "--device", "cam-1", "--name", "tiny", "--version", "1",
            "--key", keys[0], "--broker", broker.url, "--prefix", topic_prefix,
        )  # fmt: skip
        assert back.returncode == 0, back.stderr
        # Refusals of what is not a request carry an error_type, as docs/edge-agent.md says.
        bad = _raw_request(client, f"{cmd}/ping", b'{"id": "b1", "nonsense": 1}')
        assert (bad["ok"], bad["error_type"]) == (False, "ProtocolError")
        unknown = _raw_request(client, f"{cmd}/reboot", b'{"id": "b2"}')
        assert (unknown["ok"], unknown["error_type"]) == (False, "ProtocolError")
    finally:
        client.close()
        assert agent.stop() == 0
    log = agent.output()
    assert "update installed (command): now serving tiny v1" in log
    assert "update installed (command): now serving tiny v2" in log
    assert "update rolled_back (command): rolled back to tiny v1" in log
    assert "shutting down: serving tiny v1" in log
    assert "stopped; " in log


def _raw_request(client: Client, topic: str, payload: bytes) -> dict[str, Any]:
    doc = json.loads(payload)
    doc["reply_to"] = client.reply_topic
    client.publish(topic, json.dumps(doc).encode())
    return client.wait_reply(doc["id"])


def test_a_bento_is_built_from_any_folder(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "user"  # not the checkout: `bentoml build .` would find no bentofile
    folder.mkdir()
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONPATH": ""}
    imported = edgebento("bento", "import", signed_pack, "--pub", keys[1], env=env, cwd=folder)
    assert imported.returncode == 0, imported.stderr
    assert "serve it: EDGEBENTO_MODEL=tiny:v1 bentoml serve bentos.service:EdgebentoService" in (
        imported.stdout
    )
    built = edgebento("bento", "build", "tiny:v1", env=env, cwd=folder)
    assert built.returncode == 0, built.stderr
    tag = built.stdout.split()[2]
    assert f"containerize it: bentoml containerize {tag}" in built.stdout
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "get", tag, "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=folder,
    )
    assert listed.returncode == 0, listed.stderr
    assert "tiny:v1" in listed.stdout  # the model travels inside the bento
    missing = edgebento("bento", "build", "nope:v1", env=env, cwd=folder)
    assert missing.returncode == 1
    assert "nope:v1 is not in the BentoML model store" in missing.stderr
