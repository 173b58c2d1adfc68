from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.protocol import Request
from edge_agent.commands import CaptureArgs, ConfigArgs, DeployArgs, ReplyCache, parse_args
from modelpack.errors import ProtocolError


def test_the_reply_cache_answers_a_redelivery_even_after_a_restart(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path / "c.db")
    assert cache.claim("a") == (True, None)
    assert cache.claim("a") == (False, None)  # still running: no second execution
    cache.store("a", {"id": "a", "ok": True})
    cache.close()
    again = ReplyCache(tmp_path / "c.db")
    assert again.claim("a") == (False, {"id": "a", "ok": True})
    assert again.claim("b") == (True, None)


def test_arguments_are_checked_with_the_field_named() -> None:
    deploy = parse_args(DeployArgs, Request(id="1", url="s3://b/k.tar.gz"))  # type: ignore[call-arg]
    assert deploy.url == "s3://b/k.tar.gz"
    with pytest.raises(ProtocolError, match="version"):
        parse_args(DeployArgs, Request(id="1", name="m", version=0))  # type: ignore[call-arg]
    with pytest.raises(ProtocolError, match="colour"):
        parse_args(ConfigArgs, Request(id="1", colour="red"))  # type: ignore[call-arg]
    with pytest.raises(ProtocolError, match="action"):
        parse_args(CaptureArgs, Request(id="1", action="pause"))  # type: ignore[call-arg]
    assert Request(id="1", expires_at=1.0).expired()
