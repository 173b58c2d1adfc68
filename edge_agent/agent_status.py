"""What the agent says of itself: the retained status (and its last will), ``ping`` and
``/healthz``.

A base of ``edge_agent.agent.Agent``: the document is built from the parts the agent composes,
at the moment it is asked for, so the status says the model serving now, the last update, the
outbox, the shadow, the identity and the takeovers counted so far.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from cloud_sync.protocol import Status, Topics
from modelpack.errors import BrokerError

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.identity_status import IdentityStatus
    from edge_agent.inference import InferenceService
    from edge_agent.outbox import Outbox
    from edge_agent.session import Session
    from edge_agent.shadow import ShadowRunner
    from edge_agent.updater import Updater

log = logging.getLogger("edge_agent.agent")


class AgentStatus:
    config: AgentConfig
    topics: Topics
    boot_id: str
    inference: InferenceService
    updater: Updater
    outbox: Outbox
    _shadow: ShadowRunner | None  # built at the first shadow command
    identity: IdentityStatus
    session: Session

    def status(self, state: str = "online") -> Status:
        with self.updater.live:  # the model and the outcome that put it there, as one
            model, update = self.inference.model_ref, self.updater.last_update
        return Status.model_validate(
            {
                "device": self.config.device,
                "state": state,
                "model": model,
                "boot_id": self.boot_id,
                "groups": self.config.groups,
                "last_update": update,
                "applied": self.updater.applied,
                "expired": self.updater.expired,
                "outbox": self.outbox.stats(),
                "shadow": None if self._shadow is None else self._shadow.status(),
                "identity": self.identity.report(time.time()),
                "taken_over": self._taken_over(),
            }
        )

    def _taken_over(self) -> int:
        """Connections lost to another client with our client id."""
        return self.session.takeover.taken_over

    def serving_label(self) -> str:
        ref = self.inference.model_ref
        return "no model yet" if ref is None else f"{ref['name']} v{ref['version']}"

    def status_fields(self) -> dict[str, Any]:
        """What ``ping`` and ``/healthz`` answer: the status without its envelope."""
        return self.status().model_dump(mode="json", exclude={"schema_version", "state", "ts"})

    def _status_doc(self, state: str) -> bytes:
        return self.status(state).model_dump_json(exclude_none=True).encode()

    def _will(self) -> tuple[str, dict[str, Any]]:
        """The last will, which the session makes again before each connect: the status as
        of then (the takeovers counted so far, the model serving), offline; the session
        bounds it (``edge_agent.last_will``)."""
        doc = self.status("offline").model_dump(mode="json", exclude_none=True)
        return self.topics.status(self.config.device), doc

    def publish_status(self) -> None:
        if self.session.connected:
            doc = self._status_doc("online")
            try:
                self.session.publish(self.topics.status(self.config.device), doc, retain=True)
            except BrokerError as exc:  # over the broker's packet limit: the agent goes on
                log.error("status not published: %s", exc)
