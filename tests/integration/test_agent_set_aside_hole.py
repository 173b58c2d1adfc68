"""A record set aside over the broker's packet limit leaves a hole in its boot's seqs. The batch
after it is sent while the records before it are still unacknowledged, so it names a floor below
the hole, and the real ingestion (``edgebento sync`` into moto's S3) acknowledges only up to the
seq before it. On the previous code the publisher then waited for its ack timeout (an hour here)
before sending again under a floor past the hole, so the records after it stayed queued; now the
set-aside seq is a hole (``Outbox.holes``) and the publisher sends again as soon as an ack stops
there. The publisher and session of the agent on their own, over Mosquitto with MQTT 5 (the
broker says its limit; the record is kept aside, out of the queue, until a higher one)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.store import open_store
from tests.integration.test_ingest import start_sync
from tests.support.agent_telemetry import session_config, telemetry_session
from tests.support.services import MotoS3, SmallPacketMosquitto

pytestmark = pytest.mark.slow

BIG = 5  # the seq over the broker's limit on its own


def _until(done: Callable[[], bool], log: Path, timeout: float = 120.0) -> None:
    """Polls ``done`` until it holds; the ingestion's log when it never does."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_the_records_after_a_set_aside_one_are_acknowledged_without_an_ack_timeout(
    tmp_path: Path,
    small_broker: SmallPacketMosquitto,
    topic_prefix: str,
    s3_server: MotoS3,
    s3_bucket: str,
) -> None:
    from edge_agent.outbox import Outbox

    outbox = Outbox(tmp_path / "telemetry.db", "dev-h", 16 << 20)
    for i in range(11):
        pad = "x" * (2 * small_broker.max_packet if i == BIG else 100)
        assert outbox.append("reading", {"i": i, "pad": pad}) == i
    config = session_config(small_broker, tmp_path, "dev-h", "5", topic_prefix)
    url = f"s3://{s3_bucket}/fleet"
    log = tmp_path / "sync.log"
    sync = start_sync(small_broker, url, s3_server, topic_prefix, f"sync-{topic_prefix}", log)
    # A rate that sends the whole queue at once: the batch after the hole goes out before any
    # acknowledgement is applied, under the floor 0.
    session, drain = telemetry_session(config, outbox, 1e6, ack_timeout=3600)
    try:
        with session:
            _until(lambda: outbox.count == 0, log)  # every record acknowledged
            assert drain.set_aside == 1 and drain.resends == 0
    finally:
        drain.stop()
        outbox.close()
        sync.kill()
        sync.wait()
    store = open_store(url, endpoint_url=s3_server.endpoint_url)
    stored = Counter(
        (r["kind"], r["seq"])
        for key in store.list("telemetry/")
        for r in decode_jsonl_gz(store.get_bytes(key))
    )
    readings = sorted(s for k, s in stored if k == "reading")
    assert readings == [s for s in range(11) if s != BIG]
    assert ("event", 11) in stored  # the telemetry_set_aside event, behind them
    assert max(stored.values()) == 1
