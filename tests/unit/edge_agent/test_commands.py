from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_sync.protocol import CaptureCommand, ConfigCommand, DeployCommand, Request
from edge_agent.replies import ReplyCache


def test_the_reply_cache_answers_a_redelivery_even_after_a_restart(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path / "c.db")
    assert cache.claim("a") == (True, None)
    assert cache.claim("a") == (False, None)  # still running: no second execution
    cache.store("a", {"id": "a", "ok": True})
    cache.close()
    again = ReplyCache(tmp_path / "c.db")
    assert again.claim("a") == (False, {"id": "a", "ok": True})
    assert again.claim("b") == (True, None)


def test_a_corrupt_reply_cache_is_quarantined_and_recreated(tmp_path: Path) -> None:
    (tmp_path / "c.db").write_bytes(b"this is not a database" * 100)
    cache = ReplyCache(tmp_path / "c.db")
    assert [p.name.startswith("c.db.corrupt-") for p in cache.quarantined] == [True]
    assert cache.claim("a") == (True, None)


def test_arguments_are_checked_with_the_field_named() -> None:
    deploy = DeployCommand.model_validate({"id": "1", "url": "s3://b/k.tar.gz"})
    assert deploy.url == "s3://b/k.tar.gz"
    with pytest.raises(ValidationError, match="version"):
        DeployCommand.model_validate({"id": "1", "name": "m", "version": 0})
    with pytest.raises(ValidationError, match="colour"):
        ConfigCommand.model_validate({"id": "1", "colour": "red"})
    with pytest.raises(ValidationError, match="action"):
        CaptureCommand.model_validate({"id": "1", "action": "pause"})
    assert Request(id="1", expires_at=1.0).expired()


@pytest.mark.parametrize(
    "field, value",
    [
        ("telemetry_interval", 1e-6),
        ("latency_budget_ms", 0.001),
        ("max_batch", 10**9),
        ("max_payload_bytes", 1 << 40),
        ("drain_rate", 1e12),
    ],
)
def test_config_values_outside_their_ranges_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        ConfigCommand.model_validate({"id": "1", field: value})


def test_capture_max_bytes_is_bounded() -> None:
    with pytest.raises(ValidationError, match="max_bytes"):
        CaptureCommand.model_validate({"id": "1", "action": "start", "max_bytes": 1 << 40})


def test_a_reply_cache_damaged_while_the_agent_runs_is_quarantined_and_claims_go_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    cache = ReplyCache(path)
    for i in range(400):  # 8 MB of replies: past SQLite's page cache
        assert cache.claim(f"r{i}") == (True, None)
        cache.store(f"r{i}", {"id": f"r{i}", "ok": True, "pad": "x" * 20000})
    cache._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as fh:  # garbage over the middle, under the open handle
        fh.seek(size // 3)
        fh.write(b"\xde\xad\xbe\xef" * (size // 12))
    for i in range(400):  # every id is looked up: one of them meets the damage
        cache.claim(f"r{i}")
    assert len(cache.quarantined) == 1 and cache.quarantined[0].exists()
    assert cache.claim("new") == (True, None)
    cache.store("new", {"id": "new", "ok": True})
    assert cache.claim("new") == (False, {"id": "new", "ok": True})
