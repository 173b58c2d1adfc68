"""A clean stop waits for telemetry acknowledgements only while they come.

On the old code ``Agent.stop`` waited the whole 2 s for acknowledgements whenever the session
was up, so every stop of a device without an ingestion (a lab, a standalone device, most of the
test suite) cost 2 s for nothing. Now, with no acknowledgement in the agent's life, it waits one
short grace and says so, once its records have waited long enough for the silence to mean
something (``NO_ACK_EVIDENCE_S``); the records stay on disk and the next start, with an
ingestion running, delivers them, and its own clean stop ends with nothing unacknowledged. An
agent stopped right after its first send, with an ingestion up that acknowledges once a second
(``edgebento sync``'s default), waits for that acknowledgement.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from cloud_sync.store import open_store
from edge_agent.telemetry_acks import NO_ACK_EVIDENCE_S
from tests.integration.test_agent_faults import outbox_rows
from tests.integration.test_ingest import start_sync, stored
from tests.support.agent import AgentProcess, Client, wait_for, wait_online
from tests.support.services import Mosquitto, MotoS3

KEPT = re.compile(r"stopped; (\d+) telemetry records kept on disk for the next start")


def test_a_stop_without_ingestion_keeps_its_records_and_the_next_start_delivers_them(
    broker: Mosquitto,
    agent_factory: Any,
    pack_v1: Path,
    topic_prefix: str,
    s3_server: MotoS3,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    client = Client(broker)
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    sync: subprocess.Popen[bytes] | None = None
    try:
        agent: AgentProcess = agent_factory(pack=pack_v1)
        wait_online(client, topic_prefix, "dev-a", 1)
        # Records sent, and nobody acknowledges them for longer than an ingestion that is up
        # would take: no ingestion runs.
        wait_for(telemetry, lambda doc: bool(doc.get("records")), 30, agent)
        silent_since = time.monotonic()
        wait_for(telemetry, lambda doc: time.monotonic() - silent_since > NO_ACK_EVIDENCE_S, 30)
        assert agent.stop() == 0
        log = agent.output()
        assert "stopped waiting for acknowledgements after" in log
        assert "none has come since the agent started" in log
        kept = [int(n) for n in KEPT.findall(log)]
        held = outbox_rows(agent.data_dir)
        assert len(kept) == 1 and kept[0] == len(held) > 0, (kept, len(held))
        first_boot = {seq for _, seq in held}

        # The next start, with an ingestion running, delivers them; its clean stop waits for
        # the last acknowledgements and keeps nothing.
        url = f"s3://{s3_bucket}/fleet"
        store = open_store(url, endpoint_url=s3_server.endpoint_url)
        sync = start_sync(
            broker, url, s3_server, topic_prefix, f"sync-{topic_prefix}", tmp_path / "sync.log"
        )
        agent = agent_factory(pack=pack_v1)
        boot = held[0][0]
        deadline = time.monotonic() + 60
        while not first_boot <= {s for d, b, s in stored(store) if (d, b) == ("dev-a", boot)}:
            assert agent.process is not None and agent.process.poll() is None, agent.output()
            assert time.monotonic() < deadline, "the kept records were not delivered"
            time.sleep(0.2)
        # A record made just before the stop (the config event; no heartbeats after it), which
        # the stop has to wait for: the ingestion acknowledges once per flush (0.3 s).
        reply = client.request(f"{topic_prefix}/dev-a/cmd/config", {"telemetry_interval": 60})
        assert reply["ok"], reply
        assert agent.stop() == 0
        log = agent.output()
        assert "telemetry: every record acknowledged" in log
        assert [int(n) for n in KEPT.findall(log)] == [kept[0], 0]
        assert outbox_rows(agent.data_dir) == []
    finally:
        client.close()
        if sync is not None:
            sync.kill()
            sync.wait()


def test_the_first_stop_after_a_start_waits_for_an_ingestion_that_is_up(
    broker: Mosquitto,
    agent_factory: Any,
    pack_v1: Path,
    topic_prefix: str,
    s3_server: MotoS3,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """``edgebento sync`` at its default flush interval (1 s) acknowledges after the stop's
    short grace had passed: an agent stopped as soon as its first records were out kept them
    all and said no ingestion was running (the review of the first version of this change)."""
    url = f"s3://{s3_bucket}/fleet"
    sync = start_sync(
        broker, url, s3_server, topic_prefix, f"sync-{topic_prefix}", tmp_path / "sync.log",
        "--flush-interval", "1.0",
    )  # fmt: skip
    client = Client(broker)
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    try:
        agent: AgentProcess = agent_factory(pack=pack_v1)
        wait_online(client, topic_prefix, "dev-a", 1)
        wait_for(telemetry, lambda doc: bool(doc.get("records")), 30, agent)
        assert agent.stop() == 0
        log = agent.output()
        assert "telemetry: every record acknowledged" in log, log[-2000:]
        assert [int(n) for n in KEPT.findall(log)] == [0]
        assert outbox_rows(agent.data_dir) == []
    finally:
        client.close()
        sync.kill()
        sync.wait()
