"""The codec's bounds on the agent (issue 18), in its own process on a real Mosquitto: its local
HTTP endpoint and its MQTT inference reuse the serving core, so a huge OIP timeout is the
client's 400 (``ok: false``, reason ``invalid``) and never a counted error, a number the model's
dtype would change is refused, and float32 answers carry 9 significant digits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.agent import Client, wait_online
from tests.support.services import free_port, wait_for_port

pytestmark = pytest.mark.integration

ROW = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def _oip(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ROW}], **extra}


def _counted(port: int, outcome: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=15).text
    pattern = rf'^edgebento_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def _agent(
    agent_factory: Any, client: Client, pack: Path, topic_prefix: str, tmp_path: Path
) -> int:
    """An agent serving ``pack`` as dev-a, online; its metrics port."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\nmetrics_port = {port}\n")
    agent_factory(pack=pack, args=("--config", str(config)))
    wait_for_port(port)
    wait_online(client, topic_prefix, "dev-a", 1)
    return port


def test_a_huge_timeout_and_lossy_numbers_are_the_clients_on_http_and_mqtt(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    port = _agent(agent_factory, client, pack_v1, topic_prefix, tmp_path)
    url = f"http://127.0.0.1:{port}/v2/models/tiny/infer"
    huge = _oip(parameters={"timeout": 10**400})  # json.dumps writes 1 and 400 zeros
    errors = _counted(port, "error")

    answer = httpx.post(url, content=json.dumps(huge).encode(), timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "invalid" and "timeout" in answer.json()["error"]
    reply = client.request(f"{topic_prefix}/dev-a/infer", huge)
    assert reply["ok"] is False and reply["reason"] == "invalid", reply

    # A number float32 cannot hold, over both, and NaN (not JSON) over HTTP.
    lossy = _oip()
    lossy["inputs"][0]["data"] = [1e39, *ROW[1:]]
    assert httpx.post(url, json=lossy, timeout=30).status_code == 400
    reply = client.request(f"{topic_prefix}/dev-a/infer", lossy)
    assert reply["ok"] is False and reply["reason"] == "dtype" and "'x'" in reply["error"]
    nan = json.dumps(_oip()).replace("0.1,", "NaN,", 1).encode()
    assert httpx.post(url, content=nan, timeout=30).json()["reason"] == "invalid_json"

    assert _counted(port, "error") == errors
    good = httpx.post(url, json=_oip(parameters={"timeout": 5_000_000}), timeout=30)
    assert good.status_code == 200
    # float32 with at most 9 significant digits, over HTTP and MQTT alike
    over_mqtt = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [ROW]}})
    for doc in (good.json()["outputs"], over_mqtt["outputs"]):
        numbers = re.findall(r"\d[\d.]*(?:e[-+]?\d+)?", json.dumps(doc))
        longest = max(len(n.split("e")[0].replace(".", "").strip("0")) for n in numbers)
        assert longest <= 9, doc


def test_a_timeout_ms_out_of_range_is_the_clients_over_mqtt(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    """Tensor JSON's ``timeout_ms`` over MQTT is checked with a range before any conversion:
    1 and 400 zeros once raised OverflowError in ``timeout_ms / 1000`` (``reason: internal``,
    counted as the model's error)."""
    port = _agent(agent_factory, client, pack_v1, topic_prefix, tmp_path)
    topic = f"{topic_prefix}/dev-a/infer"
    errors = _counted(port, "error")

    # json.dumps writes 10**400 as 1 and 400 zeros; the others are out of range or no number.
    for timeout_ms in (10**400, 2**64, 2**64 - 1, 86_400_001, -1, "5000", [1]):
        reply = client.request(topic, {"inputs": {"x": [ROW]}, "timeout_ms": timeout_ms})
        assert reply["ok"] is False, (timeout_ms, reply)
        assert reply["reason"] == "invalid" and "timeout_ms" in reply["error"], reply
        assert len(json.dumps(reply)) < 1000  # the integer is not echoed whole

    assert _counted(port, "error") == errors, "a client's timeout was counted as a model error"
    # Within the range (up to a day; 0 is none, as OIP's timeout) the agent answers as before.
    for timeout_ms in (5000, 2.5e3, 86_400_000, 0):
        reply = client.request(topic, {"inputs": {"x": [ROW]}, "timeout_ms": timeout_ms})
        assert reply["ok"] is True, (timeout_ms, reply)
