"""Issue 19, the unconfirmed point about the command-replay cache, through a real agent on a real
Mosquitto: ``commands.db`` damaged at rest is quarantined at the next start, and a command the
broker delivers again after that is answered from the rows salvaged from the damaged file
(``duplicate: true``), not run a second time.

Before, the quarantine started an empty cache: a redelivered deploy ran again."""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import Client, wait_for, wait_online

pytestmark = pytest.mark.slow
PAGE = 4096
PINGS = 300


def _replies(q: queue.Queue[Any], n: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """The first ``n`` replies that arrive on ``q``, by request id."""
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {n} replies"
        try:
            body = json.loads(q.get(timeout=left).payload)
        except queue.Empty:
            continue
        got[body["id"]] = body
    return got


def _damage_middle_page(db: Path) -> None:
    with sqlite3.connect(db) as conn:  # the file at rest: everything in the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = db.stat().st_size // PAGE
    assert pages > 8, pages
    with db.open("r+b") as fh:
        fh.seek(pages // 2 * PAGE)
        fh.write(b"\xde\xad\xbe\xef" * (PAGE // 4))


def test_a_command_redelivered_after_the_quarantine_is_answered_not_run_again(
    agent_factory: Any, client: Client, pack_v1: Path, pack_v2: Path,
    topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    cmd = f"{topic_prefix}/dev-a/cmd"
    deploy = {"id": "deploy-v2", "url": str(pack_v2)}
    assert client.request(f"{cmd}/deploy", deploy)["ok"] is True
    reply_to = f"{topic_prefix}-pings/replies"
    pongs = client.collect(reply_to)
    for i in range(PINGS):  # enough rows for the file to span pages
        client.publish(f"{cmd}/ping", {"id": f"ping-{i}", "reply_to": reply_to})
    assert all(r["ok"] for r in _replies(pongs, PINGS).values())
    assert agent.stop() == 0
    _damage_middle_page(tmp_path / "agent" / "commands.db")

    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    agent.start()
    wait_online(client, topic_prefix, "dev-a", version=2)
    wait_for(
        telemetry,
        lambda batch: any(
            r["data"].get("event") == "state_quarantined"
            and r["data"].get("file", "").startswith("commands.db")
            for r in batch.get("records", [])
        ),
    )
    # The broker delivers the deploy again (a QoS 1 resend after a crash): answered, not run.
    again = client.request(f"{cmd}/deploy", deploy)
    assert again["ok"] is True and again.get("duplicate") is True, again
    for i in range(PINGS):
        client.publish(f"{cmd}/ping", {"id": f"ping-{i}", "reply_to": reply_to})
    replayed = _replies(pongs, PINGS)
    answered = sum(bool(r.get("duplicate")) for r in replayed.values())
    assert answered >= PINGS - 50, answered  # only the rows of the damaged page are gone
