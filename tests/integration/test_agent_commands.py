"""Each command and inference, against a real Mosquitto, with the agent in its own process."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tests.support import models
from tests.support.agent import Client, make_pack, rollback_authorization, wait_for, wait_online
from tests.support.services import Mosquitto


def _x(n: int = 2) -> list[list[float]]:
    return np.random.default_rng(7).standard_normal((n, 8)).astype(np.float32).tolist()


def test_ping_replies_on_the_mqtt5_response_topic_with_correlation_data(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    reply = client.request(f"{topic_prefix}/dev-a/cmd/ping", {}, via="response_topic")
    assert reply["ok"] is True and reply["pong"] is True
    assert reply["model"] == {"name": "tiny", "version": 1}


def test_ping_replies_to_reply_to_for_an_mqtt311_client(
    agent_factory: Any, broker: Mosquitto, pack_v1: Path, topic_prefix: str
) -> None:
    old = Client(broker, v5=False)
    try:
        agent_factory(pack=pack_v1, args=("--protocol", "3.1.1"))
        wait_online(old, topic_prefix, "dev-a")
        reply = old.request(f"{topic_prefix}/dev-a/cmd/ping", {})
        assert reply["ok"] is True and reply["device"] == "dev-a"
    finally:
        old.close()


def test_infer_answers_good_input_and_refuses_bad_input_clearly(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, mlp_model: Path
) -> None:
    import onnxruntime as ort

    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    x = _x()
    reply = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": x}})
    assert reply["ok"] is True and reply["model"] == {"name": "tiny", "version": 1}
    expected = ort.InferenceSession(str(mlp_model)).run(
        ["probs"], {"x": np.asarray(x, np.float32)}
    )[0]
    np.testing.assert_allclose(np.asarray(reply["outputs"]["probs"]), expected, rtol=1e-5)
    assert reply["latency_ms"] >= 0

    wrong_shape = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [[1.0, 2.0]]}})
    assert wrong_shape["ok"] is False and wrong_shape["reason"] == "shape"
    assert "dim 1 must be 8" in wrong_shape["error"]
    strings = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [["a"] * 8]}})
    assert strings["ok"] is False and "strings" in strings["error"]
    # Not even a request: still answered, on the response topic, with the reason.
    client.publish(f"{topic_prefix}/dev-a/infer", b"{not json", properties=_props(client))
    garbage = wait_for(
        client.queues[client.reply_topic], lambda d: "not a request" in d.get("error", "")
    )
    assert "not JSON" in garbage["error"]
    # ...and the device keeps serving.
    assert client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": x}})["ok"] is True


def _props(client: Client) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = client.reply_topic
    props.CorrelationData = b"garbage"
    return props


def test_a_duplicate_command_runs_once_and_is_answered_again(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    cmd = {"id": f"deploy-{uuid.uuid4().hex}", "url": str(pack_v2)}
    first = client.request(f"{topic_prefix}/dev-a/cmd/deploy", cmd)
    again = client.request(f"{topic_prefix}/dev-a/cmd/deploy", cmd)
    assert first["ok"] is True and first["outcome"] == "installed"
    # Executed again it would say "unchanged": the stored answer proves it ran once.
    assert again["outcome"] == "installed" and again["duplicate"] is True
    assert again["id"] == first["id"]


def test_an_expired_command_is_dropped_and_reported(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    reply = client.request(f"{topic_prefix}/dev-a/cmd/rollback", {"expires_at": time.time() - 5})
    assert reply["ok"] is False and reply["expired"] is True and "expired" in reply["error"]
    event = wait_for(
        telemetry,
        lambda b: any(r["data"].get("event") == "expired" for r in b["records"]),
    )
    assert event["records"][0]["device"] == "dev-a"


def test_config_changes_limits_and_capture_ships_samples(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    agent_factory(pack=pack_v1, args=("--store", str(store)))
    wait_online(client, topic_prefix, "dev-a")
    cfg = client.request(
        f"{topic_prefix}/dev-a/cmd/config", {"max_batch": 2, "telemetry_interval": 1}
    )
    assert cfg["ok"] is True and cfg["limits"]["max_batch"] == 2
    too_big = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": _x(3)}})
    assert too_big["ok"] is False and too_big["reason"] == "batch_too_large"
    bad = client.request(f"{topic_prefix}/dev-a/cmd/config", {"max_batch": -1})
    assert bad["ok"] is False and "max_batch" in bad["error"]

    start = client.request(f"{topic_prefix}/dev-a/cmd/capture", {"action": "start", "rate": 1.0})
    assert start["ok"] is True and start["capturing"] is True
    for _ in range(3):
        assert client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": _x(1)}})["ok"]
    stop = client.request(f"{topic_prefix}/dev-a/cmd/capture", {"action": "stop"})
    assert stop["ok"] is True and stop["samples"] == 3 and len(stop["shipped"]) == 1
    key = stop["shipped"][0]
    # The same partitioned layout as the capture records cloud_sync ingests, a stream of its own.
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert key.startswith(f"capture/date={day}/device=dev-a/part-")
    assert key.endswith(".samples-000000000001-000000000003.jsonl.gz")
    lines = gzip.decompress((store / key).read_bytes()).decode().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["answer"]["model"]["version"] == 1


def test_deploy_from_an_archive_over_http_then_rollback(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
) -> None:
    import functools
    import http.server
    import threading

    from modelpack import write_archive

    other = models.mlp(tmp_path / "other.onnx", seed=3)
    served = tmp_path / "www"
    write_archive(make_pack(tmp_path / "v2", other, keys[0], 2), served / "tiny-2.tar.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        agent_factory(pack=pack_v1)
        wait_online(client, topic_prefix, "dev-a")
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny-2.tar.gz"
        deployed = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": url})
        assert deployed["ok"] is True and deployed["model"] == {"name": "tiny", "version": 2}
        assert deployed["health"]["golden"] == "ok"
        assert (
            client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": _x()}})["model"][
                "version"
            ]
            == 2
        )
        missing = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": url + ".nope"})
        assert missing["ok"] is False and "404" in missing["error"]

        unsigned = client.request(f"{topic_prefix}/dev-a/cmd/rollback", {})
        assert unsigned["ok"] is False and "signed rollback instruction" in unsigned["error"]
        signed = rollback_authorization(keys[0], "dev-a", "tiny", 1, leaves=2)
        back = client.request(f"{topic_prefix}/dev-a/cmd/rollback", {"authorization": signed})
        assert back["ok"] is True and back["outcome"] == "rolled_back"
        assert (
            client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": _x()}})["model"][
                "version"
            ]
            == 1
        )
        other = rollback_authorization(keys[0], "dev-b", "tiny", 1)  # signed for another device
        refused = client.request(f"{topic_prefix}/dev-a/cmd/rollback", {"authorization": other})
        assert refused["ok"] is False and "for device 'dev-b'" in refused["error"]
    finally:
        server.shutdown()


def test_deploy_from_s3_by_url_and_by_name_through_the_store(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    s3_server: Any,
    s3_bucket: str,
) -> None:
    from cloud_sync.registry import Registry
    from cloud_sync.store import open_store
    from modelpack import write_archive

    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url}
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    archive = write_archive(
        make_pack(tmp_path / "v2", mlp_model, keys[0], 2), tmp_path / "v2.tar.gz"
    )
    store.put_file("loose/tiny-2.tar.gz", archive)
    Registry(store).publish(make_pack(tmp_path / "v3", mlp_model, keys[0], 3), trusted=[keys[1]])

    agent_factory(pack=pack_v1, args=("--store", f"s3://{s3_bucket}"), env=env)
    wait_online(client, topic_prefix, "dev-a")
    by_url = client.request(
        f"{topic_prefix}/dev-a/cmd/deploy", {"url": f"s3://{s3_bucket}/loose/tiny-2.tar.gz"}
    )
    assert by_url["ok"] is True and by_url["model"]["version"] == 2
    by_name = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"name": "tiny", "version": 3})
    assert by_name["ok"] is True and by_name["model"]["version"] == 3
    unknown = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"name": "tiny", "version": 9})
    assert unknown["ok"] is False and unknown["error_type"] == "NotFoundError"
