"""Hostile commands, topics, configs and downloads through a real agent process (findings 5-7).

Each of these did harm on main: a publish to ``sensors/cmd/config`` with a pipeline on
``sensors/#`` set the heartbeat to 1 µs; config and capture took any value; a server trickling
a byte every 0.5 s held the one update worker (and rollback with it) for ever; ``file:///``
copied any local tree.
"""

from __future__ import annotations

import http.server
import io
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import REPO, Client, rollback_authorization, wait_for, wait_online
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
X = [[0.5] * 8]


def test_pipeline_topics_cannot_run_commands_and_wildcard_pipelines_fire(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    sensors = f"{topic_prefix}-sensors"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[[agent.pipelines]]
name = "any-sensor"
input_topic = "{sensors}/#"
output_topic = "{sensors}-out/decision"
"""
    )
    agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    out = client.collect(f"{sensors}-out/decision")
    client.publish(f"{sensors}/cmd/config", {"id": "c1", "telemetry_interval": 1e-6})
    client.publish(f"{sensors}/room1/reading", [0.3] * 8)  # on main: a wildcard never fired
    decision = wait_for(out, lambda d: "outputs" in d)
    assert decision["pipeline"] == "any-sensor"
    limits = client.request(f"{topic_prefix}/dev-a/cmd/ping", {})
    assert limits["pong"] is True
    beats = client.collect(f"{topic_prefix}/dev-a/telemetry")
    time.sleep(2)
    assert beats.qsize() < 20  # the 0.5 s heartbeat of the harness, not 1,759 records a second


def test_a_pipeline_overlapping_the_device_topics_is_refused_at_load(
    broker: Mosquitto, pack_v1: Path, topic_prefix: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[[agent.pipelines]]\nname = "sneaky"\ninput_topic = "{topic_prefix}/+/cmd/#"\n'
        'output_topic = "out/x"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--device", "dev-a",
         "--broker", broker.url, "--data-dir", str(tmp_path / "d"), "--trust", str(keys[1]),
         "--prefix", topic_prefix],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "overlaps the device's own topics" in done.stderr


def test_config_and_capture_values_are_bounded(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    cmd = f"{topic_prefix}/dev-a/cmd"
    for args in ({"telemetry_interval": 1e-6}, {"latency_budget_ms": 0.001},
                 {"max_payload_bytes": 1 << 40}, {"drain_rate": 1e12}):  # fmt: skip
        reply = client.request(f"{cmd}/config", args)
        assert reply["ok"] is False and next(iter(args)) in reply["error"], reply
    big = client.request(f"{cmd}/capture", {"action": "start", "max_bytes": 1 << 40})
    assert big["ok"] is False and "max_bytes" in big["error"]
    fine = client.request(f"{cmd}/config", {"telemetry_interval": 2})
    assert fine["ok"] is True and fine["limits"]["telemetry_interval"] == 2


class _Trickle(http.server.BaseHTTPRequestHandler):
    """One byte every 0.5 s, for ever (what held the update worker on main)."""

    def do_GET(self) -> None:
        if self.path.startswith("/big"):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            return
        if self.path.startswith(("/bomb", "/v1")):
            body = getattr(self.server, self.path[1:].split(".")[0])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.end_headers()
        try:
            while not self.server.stopping.is_set():  # type: ignore[attr-defined]
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


def _bomb() -> bytes:
    info = tarfile.TarInfo("manifest.json")
    info.size = 2
    info.pax_headers = {"comment": "x" * (100 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()


@pytest.fixture
def trickle_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.stopping = threading.Event()  # type: ignore[attr-defined]
    server.bomb = _bomb()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stopping.set()  # type: ignore[attr-defined]
    server.shutdown()


@pytest.fixture
def trickle(trickle_server: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{trickle_server.server_address[1]}"


def test_a_trickling_download_blocks_nothing_and_is_cancelled_or_times_out(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    trickle: str,
    trickle_server: http.server.ThreadingHTTPServer,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    from modelpack import write_archive

    server = trickle_server
    server.v1 = write_archive(pack_v1, tmp_path / "v1.tar.gz").read_bytes()  # type: ignore[attr-defined]
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\ndownload_deadline_s = 6\n")
    agent_factory(pack=pack_v2, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v1)})["ok"] is False
    cmd = f"{topic_prefix}/dev-a/cmd"
    # The slow deploys answer on a topic of their own: waiting for other replies on the
    # client's reply topic would swallow theirs.
    deploy_replies = client.collect(f"{topic_prefix}-deploys/replies")
    slow = {"id": "slow-1", "url": f"{trickle}/slow.tar.gz",
            "reply_to": f"{topic_prefix}-deploys/replies"}  # fmt: skip
    client.publish(f"{cmd}/deploy", slow)
    time.sleep(1)
    started = time.monotonic()
    assert client.request(f"{cmd}/ping", {}, timeout=5)["pong"] is True
    answer = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}}, timeout=5)
    assert answer["ok"] is True and time.monotonic() - started < 5
    cancelled = client.request(f"{cmd}/cancel", {}, timeout=5)
    assert cancelled["ok"] is True and cancelled["cancelled"] == "update"
    reply = wait_for(deploy_replies, lambda d: d["id"] == "slow-1", 15)
    assert reply["ok"] is False and reply["error_type"] == "CancelledError"
    # A rollback is answered at once, and takes precedence over the download.
    client.publish(f"{cmd}/deploy", {**slow, "id": "slow-2"})
    time.sleep(0.5)
    signed = rollback_authorization(keys[0], "dev-a", "tiny", 1, leaves=2)
    back = client.request(
        f"{cmd}/rollback", {"authorization": signed, "url": f"{trickle}/v1.tar.gz"}, 10
    )
    assert back["ok"] is True and back["model"]["version"] == 1
    superseded = wait_for(deploy_replies, lambda d: d["id"] == "slow-2", 15)
    assert superseded["ok"] is False and "takes precedence" in superseded["error"]
    # Left alone, the overall deadline (6 s here) ends it.
    client.publish(f"{cmd}/deploy", {**slow, "id": "slow-3"})
    timed_out = wait_for(deploy_replies, lambda d: d["id"] == "slow-3", 30)
    assert timed_out["ok"] is False and "deadline" in timed_out["error"]


def test_downloads_are_bounded_and_local_paths_confined(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    topic_prefix: str,
    trickle: str,
    tmp_path: Path,
) -> None:
    import psutil

    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    cmd = f"{topic_prefix}/dev-a/cmd/deploy"
    big = client.request(cmd, {"url": f"{trickle}/big.tar.gz"})
    assert big["ok"] is False and "the cap is" in big["error"]
    bomb = client.request(cmd, {"url": f"{trickle}/bomb.tar.gz"})
    assert bomb["ok"] is False and "header" in bomb["error"]
    hwm = psutil.Process(agent.process.pid).memory_info().rss
    assert hwm < 300 << 20  # on main the pax header alone drove it to 834 MB
    outside = client.request(cmd, {"url": "file:///etc"})
    assert outside["ok"] is False and "file_roots" in outside["error"]
    assert client.request(cmd, {"url": "/usr/lib"})["ok"] is False
