"""The narrow views of the agent that its parts are given, instead of the whole ``Agent``.

Import path and API::

    from edge_agent.ports import CommandHost, DispatchHost, MetricsSource, UpdateHost

``edge_agent.agent`` composes the parts and satisfies every one of these (structurally: it
names none of them); the parts import only this module, never the agent, so ``agent``,
``commands``, ``dispatch``, ``metrics`` and ``trust`` import no circle
(tests/unit/test_import_rules.py). Each view holds what its users read or call, nothing more:

- ``UpdateHost``: what ``trust`` needs to authorize a rollback and reconcile a desired state.
- ``CommandHost``: what the command handlers of ``commands`` call.
- ``DispatchHost``: what ``dispatch`` routes messages to and answers with.
- ``MetricsSource``: what ``metrics`` reads at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cloud_sync.protocol import Topics
    from edge_agent.capture import Capture
    from edge_agent.config import AgentConfig
    from edge_agent.inference import InferenceService
    from edge_agent.outbox import Outbox
    from edge_agent.pipelines import Pipeline
    from edge_agent.replies import ReplyCache
    from edge_agent.session import Session
    from edge_agent.shadow import ShadowRunner
    from edge_agent.telemetry import TelemetryPublisher
    from edge_agent.updater import Updater
    from edge_agent.updates import UpdateWorker


class UpdateHost(Protocol):
    config: AgentConfig
    updater: Updater
    updates: UpdateWorker

    def record(self, kind: str, data: dict[str, Any]) -> None: ...

    def publish_status(self) -> None: ...


class CommandHost(UpdateHost, Protocol):
    capture: Capture

    @property
    def shadow(self) -> ShadowRunner: ...

    def status_fields(self) -> dict[str, Any]: ...

    def apply_limits(self, changes: dict[str, Any]) -> dict[str, Any]: ...


class DispatchHost(CommandHost, Protocol):
    topics: Topics
    inference: InferenceService
    pipelines: list[Pipeline]
    telemetry: TelemetryPublisher
    replies: ReplyCache
    session: Session


class MetricsSource(Protocol):
    outbox: Outbox
    telemetry: TelemetryPublisher
    updater: Updater
    replies: ReplyCache
    session: Session
