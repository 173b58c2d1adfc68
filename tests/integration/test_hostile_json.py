"""JSON that Python's parser refuses with something other than JSONDecodeError, through the real
processes that read it: an integer of 5,000 digits (``ValueError``, Python's int max str
digits) and arrays nested 5,000 deep (``RecursionError``). On the previous code each of these
escaped the reader's ``except``: the agent answered no command, ``rollout list`` and
``monitor`` failed outright on one object a bucket writer planted, ``pack inspect`` printed a
ValueError, and the agent would not start on such a config file. Here each is refused the way
the surface refuses anything malformed, and the rest goes on.
"""

from __future__ import annotations

import gzip
import json
import queue
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agent import REPO, Client, ModuleAgent, wait_online
from tests.support.cli_run import run_cli
from tests.support.services import Mosquitto, MotoS3

pytestmark = pytest.mark.slow

DEEP = b"[" * 5000 + b"]" * 5000
HOSTILE = {
    "digits": b'{"id": "x", "n": ' + b"1" * 5000 + b"}",
    "deep": b'{"id": "x", "n": ' + DEEP + b"}",
}


@pytest.mark.parametrize("command", ["ping", "no-such-command"])
def test_the_agent_refuses_a_hostile_command_payload_and_answers_the_next(
    module_agent: ModuleAgent, client: Client, command: str
) -> None:
    prefix, device = module_agent.prefix, "dev-a"
    wait_online(client, prefix, device)
    for kind, payload in HOSTILE.items():
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = client.reply_topic, correlation
        replies = client.queues[client.reply_topic]
        client.publish(f"{prefix}/{device}/cmd/{command}", payload, properties=props)
        # On the previous code the deep payload raised RecursionError in the handler: no reply.
        refusal = _reply_with(replies, correlation)
        assert refusal["ok"] is False and refusal["error_type"] == "ProtocolError", kind
    assert client.request(f"{prefix}/{device}/cmd/ping", {})["pong"] is True


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_the_agent_refuses_a_request_whose_expiry_is_not_a_number(
    module_agent: ModuleAgent, client: Client, literal: str
) -> None:
    """NaN compares false with every time: on the previous code such a request never expired,
    and ran (ping answered pong)."""
    prefix = module_agent.prefix
    wait_online(client, prefix, "dev-a")
    request_id = uuid.uuid4().hex
    payload = (
        f'{{"id": "{request_id}", "expires_at": {literal}, "reply_to": "{client.reply_topic}"}}'
    )
    client.publish(f"{prefix}/dev-a/cmd/ping", payload.encode())
    refusal = client.wait_reply(request_id)
    assert refusal["ok"] is False and "finite" in refusal["error"]


def _reply_with(replies: Any, correlation: bytes, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = replies.get(timeout=left)
        except queue.Empty:
            break
        if msg.properties.CorrelationData == correlation:
            doc: dict[str, Any] = json.loads(msg.payload)
            return doc
    raise AssertionError(f"no reply within {timeout}s")


@pytest.mark.parametrize(
    "setting",
    [f"heartbeat_interval = {'1' * 5000}", f"extra = {'[' * 5000}{']' * 5000}"],
    ids=["digits", "deep"],
)
def test_the_agent_refuses_a_hostile_config_file_with_a_reason(
    broker: Mosquitto, tmp_path: Path, keys: tuple[Path, Path], setting: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\n{setting}\n")
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--device", "dev-a",
         "--broker", broker.url, "--data-dir", str(tmp_path / "d"), "--trust", str(keys[1])],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"config file {config}" in done.stderr
    assert "Traceback" not in done.stderr


def _put(s3: MotoS3, bucket: str, key: str, body: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=body)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_rollout_list_skips_a_planted_rollout_that_is_not_json(
    s3_server: MotoS3, s3_bucket: str, kind: str
) -> None:
    _put(s3_server, s3_bucket, "fleet/rollouts/planted.json", HOSTILE[kind])
    done = run_cli(
        "rollout", "list", "--store", f"s3://{s3_bucket}/fleet",
        "--endpoint-url", s3_server.endpoint_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # the previous code: ValueError / RecursionError
    assert "rollout planted" in done.stderr and "is not JSON" in done.stderr


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_monitor_counts_a_planted_drift_object_it_cannot_read_and_goes_on(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path, kind: str
) -> None:
    key = "fleet/drift/date=2026-01-01/device=d1/part-b1-000000000001-000000000001.jsonl.gz"
    _put(s3_server, s3_bucket, key, gzip.compress(HOSTILE[kind] + b"\n"))
    _put(s3_server, s3_bucket, key.replace("part-b1", "part-b2"), b"not gzip at all")
    done = run_cli(
        "monitor", "--store", f"s3://{s3_bucket}/fleet", "--endpoint-url",
        s3_server.endpoint_url, "--out", str(tmp_path / "drift"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert result["rejected_summaries"] == {"unreadable": 2}


def test_fleet_status_skips_planted_telemetry_objects_and_shows_the_others(
    broker: Mosquitto, s3_server: MotoS3, s3_bucket: str, topic_prefix: str
) -> None:
    day = datetime.now(UTC).strftime("%Y-%m-%d")

    def part(device: str, boot: str, lines: list[bytes]) -> None:
        key = f"fleet/telemetry/date={day}/device={device}/part-{boot}-{1:012d}-{1:012d}.jsonl.gz"
        _put(s3_server, s3_bucket, key, gzip.compress(b"\n".join(lines) + b"\n"))

    def record(device: str, data: object) -> bytes:
        doc = {"device": device, "boot_id": "b1", "seq": 1, "ts": time.time(),
               "kind": "heartbeat", "data": data}  # fmt: skip
        return json.dumps(doc).encode()

    part("bad-digits", "b1", [HOSTILE["digits"]])
    part("bad-deep", "b1", [HOSTILE["deep"]])
    part("bad-data", "b1", [record("bad-data", [1, 2])])  # data a list: AttributeError before
    part("good", "b1", [record("good", {})])
    done = run_cli(
        "fleet", "status", "--broker", broker.url, "--prefix", topic_prefix, "--listen", "0.2",
        "--store", f"s3://{s3_bucket}/fleet", "--endpoint-url", s3_server.endpoint_url, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["devices"]) == {"good"}
    assert done.stderr.count("fleet status: skipped") == 3, done.stderr


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_pack_inspect_refuses_a_hostile_manifest_with_a_reason(tmp_path: Path, kind: str) -> None:
    (tmp_path / "manifest.json").write_bytes(HOSTILE[kind])
    done = run_cli("pack", "inspect", str(tmp_path))
    assert done.returncode == 1
    assert "error: manifest.json is not JSON" in done.stderr  # not "ValueError: Exceeds..."
