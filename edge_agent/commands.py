"""The commands a device obeys and their replay cache.

``ping``, ``deploy``, ``rollback`` (signed: ``edge_agent.trust``), ``config`` and ``capture``
(values bounded by the protocol's ranges) and ``cancel`` (the download in progress). Each is
parsed with its model in ``cloud_sync.protocol`` by ``edge_agent.dispatch``. A command is
executed at most once per ``id``: its reply is kept (in SQLite, so a redelivery after a restart
is answered too) and sent again when the same ``id`` comes back.
"""

from __future__ import annotations

import contextlib
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
    ShadowCommand,
)
from edge_agent.localdb import connect, is_corruption, quarantine
from edge_agent.trust import rollback_command
from modelpack.errors import ProtocolError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

KEEP_REPLIES = 2000
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, ts REAL, body TEXT);"


class ReplyCache:
    """Replies by command id; ``claim`` says whether this delivery is the first one.

    A corrupt file is quarantined (``edge_agent.localdb``) without losing the cache: the rows
    still readable in the damaged file are copied into the new one, and the replies this process
    stored are kept in memory too and written back, so a command redelivered after a quarantine
    is still answered from the cache instead of running a second time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.quarantined: list[Path] = []
        self._memory: dict[str, tuple[float, str]] = {}  # the newest KEEP_REPLIES replies
        self._db, aside = connect(path, _SCHEMA)
        if aside is not None:
            self.quarantined.append(aside)
            self._restore(salvage(aside))
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """A file damaged at run time: aside, a new one, and the cache put back into it."""
        if is_corruption(exc):
            self._db.close()
            aside = quarantine(self.path)
            self.quarantined.append(aside)
            self._db, _ = connect(self.path, _SCHEMA)
            self._restore({**salvage(aside), **self._memory})

    def _restore(self, rows: dict[str, tuple[float, str]]) -> None:
        newest = sorted(rows.items(), key=lambda item: item[1][0])[-KEEP_REPLIES:]
        with contextlib.suppress(sqlite3.DatabaseError):  # a full disk: memory still answers
            self._db.executemany(
                "INSERT OR REPLACE INTO replies(id, ts, body) VALUES(?, ?, ?)",
                [(rid, ts, body) for rid, (ts, body) in newest],
            )
        self._memory.update(newest)

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
            if row is None and request_id in self._memory:
                row = (self._memory[request_id][1],)
            if row is not None:
                return False, json.loads(row[0])
            if request_id in self._running:
                return False, None
            self._running.add(request_id)
            return True, None

    def store(self, request_id: str, reply: dict[str, Any]) -> None:
        body = json.dumps(reply, default=str)
        with self._lock:
            self._running.discard(request_id)
            self._memory[request_id] = (time.time(), body)
            if len(self._memory) > KEEP_REPLIES:
                del self._memory[next(iter(self._memory))]
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies(id, ts, body) VALUES(?, ?, ?)",
                    (request_id, time.time(), body),
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


def salvage(aside: Path) -> dict[str, tuple[float, str]]:
    """The replies still readable in a quarantined file, row by row (a damaged page costs the
    rows on it, not the cache)."""
    rows: dict[str, tuple[float, str]] = {}
    try:
        db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows
    try:
        try:
            (top,) = db.execute("SELECT max(rowid) FROM replies").fetchone()
        except sqlite3.Error:
            return rows
        top = int(top or 0)
        for rowid in range(top, max(0, top - 10 * KEEP_REPLIES), -1):  # newest rows first
            if len(rows) >= KEEP_REPLIES:
                break
            with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                got = db.execute(
                    "SELECT id, ts, body FROM replies WHERE rowid = ?", (rowid,)
                ).fetchone()
                if got is not None:
                    json.loads(got[2])  # only a reply that still parses is worth keeping
                    rows[str(got[0])] = (float(got[1]), str(got[2]))
    finally:
        db.close()
    return rows


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


def shadow(agent: Agent, request: Request) -> dict[str, Any]:
    assert isinstance(request, ShadowCommand)
    if request.action == "stop":
        return agent.shadow.stop("stopped by command")
    if request.name is None or request.version is None:
        raise ProtocolError('shadow start needs {"name": ..., "version": ...}')
    return agent.shadow.start(request.name, request.version, request.rate, request.for_s)


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
    "shadow": shadow,
}
# Where each runs: deploys and shadows on the update worker (downloads); rollback and capture on a
# command worker, so they never wait behind a download; the rest on the network thread.
WHERE = {"deploy": "update", "rollback": "worker", "capture": "worker", "shadow": "update"}
assert set(HANDLERS) == set(COMMANDS)
