"""A telemetry batch's ``skip``: seqs of its boot that will never come (rows the device found
corrupt and deleted, records set aside over the packet limit). The real ingestion (``edgebento
sync`` into moto's S3, over Mosquitto) acknowledges past them in one round trip, where the
``floor`` alone moved past one hole per acknowledgement. Previous code: the batch was refused
(``schema``: ``skip`` was an unknown field) and nothing was acknowledged."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_sync.protocol import TelemetryBatch
from tests.integration.test_ingest import start_sync
from tests.support.agent import Client, wait_for
from tests.support.services import Mosquitto, MotoS3

pytestmark = pytest.mark.slow


def _record(seq: int, boot: str = "b1") -> dict[str, Any]:
    return {"schema_version": 1, "device": "dev-s", "boot_id": boot, "seq": seq,
            "ts": time.time(), "kind": "heartbeat", "data": {}}  # fmt: skip


def _ack_past(
    client: Client, acks: queue.Queue[mqtt.MQTTMessage], topic: str, doc: dict[str, Any], seq: int
) -> dict[str, Any]:
    """Publish ``doc`` until an ack of ``seq`` or more comes (the sync may not listen yet)."""
    for _ in range(60):
        client.publish(topic, doc)
        try:
            return wait_for(acks, lambda a: a["boot_id"] == "b1" and a["seq"] >= seq, 2.0)
        except AssertionError:
            continue
    raise AssertionError(f"no ack of seq {seq} for {json.dumps(doc)[:200]}")


def test_the_ingestion_acknowledges_past_skipped_seqs_in_one_round_trip(
    client: Client, broker: Mosquitto, topic_prefix: str, s3_server: MotoS3, s3_bucket: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    url = f"s3://{s3_bucket}/fleet"
    sync = start_sync(broker, url, s3_server, topic_prefix, f"sync-{topic_prefix}", tmp_path / "s")
    topic = f"{topic_prefix}/dev-s/telemetry"
    acks = client.collect(f"{topic}/ack")
    try:
        first = {"schema_version": 1, "records": [_record(0)]}
        assert _ack_past(client, acks, topic, first, 0)["seq"] == 0
        # Every other seq from 1 to 199 will never come: one batch names them.
        holes = list(range(1, 200, 2))
        good = [_record(s) for s in range(2, 201, 2)]
        doc = {"schema_version": 1, "records": good, "floor": 1, "skip": holes}
        assert _ack_past(client, acks, topic, doc, 200)["seq"] == 200
    finally:
        sync.kill()
        sync.wait()


@pytest.mark.parametrize(
    ("floor", "skip", "why"),
    [
        (None, [3], "skip needs a floor"),
        (2, [1], "outside"),
        (2, [9], "outside"),
        (2, [4], "also a record"),
        (2, list(range(2, 1100)), "1000"),
    ],
)
def test_a_skip_that_does_not_fit_its_batch_is_refused(
    floor: int | None, skip: list[int], why: str
) -> None:
    doc = {"schema_version": 1, "records": [_record(4), _record(6)], "floor": floor, "skip": skip}
    with pytest.raises(ValueError, match=why):
        TelemetryBatch.model_validate_json(json.dumps(doc))
