"""The commands a device obeys (ping, deploy, rollback, config, capture) and their replay cache.

A command is executed at most once per ``id``: its reply is kept (in SQLite, so a redelivery
after a restart is answered too) and sent again when the same ``id`` comes back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.protocol import COMMANDS, Request
from modelpack.errors import ProtocolError, first_problem

if TYPE_CHECKING:
    from edge_agent.agent import Agent

KEEP_REPLIES = 2000


class ReplyCache:
    """Replies by command id; ``claim`` says whether this delivery is the first one."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, ts REAL, body TEXT)"
        )
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def claim(self, request_id: str) -> tuple[bool, dict[str, Any] | None]:
        """(first delivery?, the stored reply of an earlier delivery if it finished)."""
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM replies WHERE id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                return False, json.loads(row[0])
            if request_id in self._running:
                return False, None
            self._running.add(request_id)
            return True, None

    def store(self, request_id: str, reply: dict[str, Any]) -> None:
        with self._lock:
            self._running.discard(request_id)
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies(id, ts, body) VALUES(?, ?, ?)",
                    (request_id, time.time(), json.dumps(reply, default=str)),
                )
                self._db.execute(
                    "DELETE FROM replies WHERE id NOT IN "
                    "(SELECT id FROM replies ORDER BY ts DESC LIMIT ?)",
                    (KEEP_REPLIES,),
                )
            except sqlite3.OperationalError:
                pass  # a full disk: the reply was still sent; only replay is lost

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeployArgs(_Args):
    url: str | None = None
    name: str | None = None
    version: int | None = Field(default=None, gt=0)


class RollbackArgs(_Args):
    version: int | None = Field(default=None, gt=0)


class ConfigArgs(_Args):
    telemetry_interval: float | None = Field(default=None, gt=0)
    max_batch: int | None = Field(default=None, gt=0)
    max_payload_bytes: int | None = Field(default=None, gt=0)
    drain_rate: float | None = Field(default=None, gt=0)
    latency_budget_ms: float | None = Field(default=None, gt=0)


class CaptureArgs(_Args):
    action: str = Field(pattern="^(start|stop|status)$")
    rate: float | None = Field(default=None, gt=0, le=1)
    max_bytes: int | None = Field(default=None, gt=0)


def parse_args(model: type[_Args], request: Request) -> Any:
    args = {k: v for k, v in request.args.items() if k != "schema_version"}
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise ProtocolError(f"{first_problem(exc, 'arguments')}") from exc


def ping(agent: Agent, request: Request) -> dict[str, Any]:
    return {"pong": True, **agent.status_fields()}


def deploy(agent: Agent, request: Request) -> dict[str, Any]:
    args = parse_args(DeployArgs, request)
    if args.url:
        return agent.updater.deploy_url(args.url)
    if args.name and args.version:
        return agent.updater.deploy_named(args.name, args.version)
    raise ProtocolError('deploy needs {"url": ...} or {"name": ..., "version": ...}')


def rollback(agent: Agent, request: Request) -> dict[str, Any]:
    return agent.updater.rollback(parse_args(RollbackArgs, request).version)


def config(agent: Agent, request: Request) -> dict[str, Any]:
    changes = parse_args(ConfigArgs, request).model_dump(exclude_none=True)
    if not changes:
        raise ProtocolError(f"config needs one of {', '.join(ConfigArgs.model_fields)}")
    return {"limits": agent.apply_limits(changes)}


def capture(agent: Agent, request: Request) -> dict[str, Any]:
    args = parse_args(CaptureArgs, request)
    if args.action == "start":
        return agent.capture.start(args.rate, args.max_bytes)
    if args.action == "stop":
        return agent.capture.stop()
    return agent.capture.status()


HANDLERS: dict[str, Callable[[Agent, Request], dict[str, Any]]] = {
    "ping": ping,
    "deploy": deploy,
    "rollback": rollback,
    "config": config,
    "capture": capture,
}
# Commands that may take long run on the update worker, not on the network thread.
SLOW = {"deploy", "rollback", "capture"}
assert set(HANDLERS) == set(COMMANDS)
