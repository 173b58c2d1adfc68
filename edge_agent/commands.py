"""The commands a device obeys and their replay cache.

``ping``, ``deploy``, ``rollback`` (signed: ``edge_agent.trust``), ``config`` and ``capture``
(values bounded by the protocol's ranges) and ``cancel`` (the download in progress). Each is
parsed with its model in ``cloud_sync.protocol`` by ``edge_agent.dispatch``. A command is
executed at most once per ``id``: its reply is kept (in SQLite, so a redelivery after a restart
is answered too) and sent again when the same ``id`` comes back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_sync.protocol import (
    COMMANDS,
    CaptureCommand,
    ConfigCommand,
    DeployCommand,
    Request,
    RollbackCommand,
)
from edge_agent.localdb import connect, is_corruption, quarantine
from edge_agent.trust import rollback_command
from modelpack.errors import ProtocolError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

KEEP_REPLIES = 2000
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, ts REAL, body TEXT);"


class ReplyCache:
    """Replies by command id; ``claim`` says whether this delivery is the first one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.quarantined: list[Path] = []
        self._db, aside = connect(path, _SCHEMA)
        if aside is not None:
            self.quarantined.append(aside)
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """A file damaged at run time: aside, and a new one (only replay is lost)."""
        if is_corruption(exc):
            self._db.close()
            self.quarantined.append(quarantine(self.path))
            self._db, _ = connect(self.path, _SCHEMA)

    def claim(self, request_id: str) -> tuple[bool, dict[str, Any] | None]:
        """(first delivery?, the stored reply of an earlier delivery if it finished)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT body FROM replies WHERE id = ?", (request_id,)
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                row = None
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
            except sqlite3.DatabaseError as exc:
                self._recover(exc)  # a full disk: the reply was still sent; only replay is lost

    def close(self) -> None:
        with self._lock:
            self._db.close()


def ping(agent: Agent, request: Request) -> dict[str, Any]:
    return {"pong": True, **agent.status_fields()}


def deploy(agent: Agent, request: Request) -> dict[str, Any]:
    assert isinstance(request, DeployCommand)
    if request.url:
        return agent.updater.deploy_url(request.url)
    if request.name and request.version:
        return agent.updater.deploy_named(request.name, request.version)
    raise ProtocolError('deploy needs {"url": ...} or {"name": ..., "version": ...}')


def rollback(agent: Agent, request: Request) -> dict[str, Any]:
    assert isinstance(request, RollbackCommand)
    return rollback_command(agent, request)


def config(agent: Agent, request: Request) -> dict[str, Any]:
    assert isinstance(request, ConfigCommand)
    changes = request.changes()
    if not changes:
        fields = [f for f in ConfigCommand.model_fields if f not in Request.model_fields]
        raise ProtocolError(f"config needs one of {', '.join(fields)}")
    return {"limits": agent.apply_limits(changes)}


def capture(agent: Agent, request: Request) -> dict[str, Any]:
    assert isinstance(request, CaptureCommand)
    if request.action == "start":
        return agent.capture.start(request.rate, request.max_bytes)
    if request.action == "stop":
        return agent.capture.stop()
    return agent.capture.status()


def cancel(agent: Agent, request: Request) -> dict[str, Any]:
    what = agent.updates.cancel(f"cancel command {request.id}")
    return {"cancelled": what}


HANDLERS: dict[str, Callable[[Agent, Request], dict[str, Any]]] = {
    "ping": ping,
    "deploy": deploy,
    "rollback": rollback,
    "config": config,
    "capture": capture,
    "cancel": cancel,
}
# Where each runs: deploys on the update worker (downloads); rollback and capture on a command
# worker, so they never wait behind a download; the rest on the network thread.
WHERE = {"deploy": "update", "rollback": "worker", "capture": "worker"}
assert set(HANDLERS) == set(COMMANDS)
