"""The commands a device obeys.

``ping``, ``deploy``, ``rollback`` (signed: ``edge_agent.trust``), ``config`` and ``capture``
(values bounded by the protocol's ranges) and ``cancel`` (the download in progress). Each is
parsed with its model in ``cloud_sync.protocol`` by ``edge_agent.dispatch``, which runs each at
most once per ``id`` (``edge_agent.replies``). A handler sees the agent through the narrow
``CommandHost`` (``edge_agent.ports``), never the whole agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloud_sync.protocol import (
    COMMANDS,
    CaptureCommand,
    ConfigCommand,
    DeployCommand,
    Request,
    RollbackCommand,
    ShadowCommand,
)
from edge_agent.ports import CommandHost
from edge_agent.trust import rollback_command
from modelpack.errors import ProtocolError


def ping(agent: CommandHost, request: Request) -> dict[str, Any]:
    return {"pong": True, **agent.status_fields()}


def deploy(agent: CommandHost, request: Request) -> dict[str, Any]:
    assert isinstance(request, DeployCommand)
    if request.url:
        return agent.updater.deploy_url(request.url)
    if request.name and request.version:
        return agent.updater.deploy_named(request.name, request.version)
    raise ProtocolError('deploy needs {"url": ...} or {"name": ..., "version": ...}')


def rollback(agent: CommandHost, request: Request) -> dict[str, Any]:
    assert isinstance(request, RollbackCommand)
    return rollback_command(agent, request)


def config(agent: CommandHost, request: Request) -> dict[str, Any]:
    assert isinstance(request, ConfigCommand)
    changes = request.changes()
    if not changes:
        fields = [f for f in ConfigCommand.model_fields if f not in Request.model_fields]
        raise ProtocolError(f"config needs one of {', '.join(fields)}")
    return {"limits": agent.apply_limits(changes)}


def capture(agent: CommandHost, request: Request) -> dict[str, Any]:
    assert isinstance(request, CaptureCommand)
    if request.action == "start":
        return agent.capture.start(request.rate, request.max_bytes)
    if request.action == "stop":
        return agent.capture.stop()
    return agent.capture.status()


def shadow(agent: CommandHost, request: Request) -> dict[str, Any]:
    assert isinstance(request, ShadowCommand)
    if request.action == "stop":
        return agent.shadow.stop("stopped by command")
    if request.name is None or request.version is None:
        raise ProtocolError('shadow start needs {"name": ..., "version": ...}')
    return agent.shadow.start(request.name, request.version, request.rate, request.for_s)


def cancel(agent: CommandHost, request: Request) -> dict[str, Any]:
    what = agent.updates.cancel(f"cancel command {request.id}")
    return {"cancelled": what}


HANDLERS: dict[str, Callable[[CommandHost, Request], dict[str, Any]]] = {
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
