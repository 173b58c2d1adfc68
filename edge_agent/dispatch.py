"""Routing a device's MQTT messages, and building the replies: topics parsed exactly.

A message is for this device only when its topic is exactly one of the device's own
(``{prefix}/{device}/cmd/{name}``, ``.../infer``, ``.../desired``, ``.../telemetry/ack``) or a
command of a group the device is in; anything else goes to the pipeline whose filter matches it
(pipelines may not overlap the device's topics: refused when the config is loaded), and is
otherwise ignored. Requests are parsed with the protocol's models, answered on the MQTT 5
response topic or the request's ``reply_to``, and a command runs at most once per ``id``.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from cloud_sync.protocol import COMMAND_MODELS, Reply, Request
from cloud_sync.redact import redact_text
from edge_agent import commands
from edge_agent.session import Incoming
from modelpack.errors import EdgebentoError, ProtocolError, first_problem

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.topics, self.device = agent.topics, agent.config.device
        self.groups = set(agent.config.groups)
        # Small models answer fastest on the network thread itself (no hand-off between
        # threads); a big model gets workers so the network loop keeps reading and pinging.
        workers = agent.config.inference_workers
        self.infer_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="infer")
        self._infer_inline = workers == 0
        # Quick local commands (capture, rollback to a kept pack) never wait behind a download.
        self.command_pool = ThreadPoolExecutor(2, thread_name_prefix="command")

    def subscriptions(self) -> list[str]:
        t, d = self.topics, self.device
        topics = [t.infer(d), t.cmd(d, "+"), t.desired(d), t.telemetry_ack(d)]
        topics += [t.group_cmd(g, "+") for g in sorted(self.groups)]
        return topics + [p.config.input_topic for p in self.agent.pipelines]

    # --- routing ---------------------------------------------------------------------------------

    def on_message(self, msg: Incoming) -> None:
        parsed = self.topics.parse(msg.topic)
        agent = self.agent
        if parsed is not None and parsed.kind == "group_cmd":
            if parsed.group in self.groups and parsed.name is not None:
                self._command(msg, parsed.name)
            return
        if parsed is not None and parsed.device == self.device:
            if parsed.kind == "infer":
                if self._infer_inline:
                    self._infer(msg)
                else:  # a bounded queue: past it, the request is answered busy at once
                    agent.inference.submit(self.infer_pool, self._infer, msg, time.monotonic())
            elif parsed.kind == "desired":
                if msg.payload:
                    agent.updates.submit_desired(msg.payload)
            elif parsed.kind == "telemetry_ack":
                agent.telemetry.on_ack(msg.payload)
            elif parsed.kind == "cmd" and parsed.name is not None:
                self._command(msg, parsed.name)
            return
        for pipeline in agent.pipelines:
            if mqtt.topic_matches_sub(pipeline.config.input_topic, msg.topic):
                self.infer_pool.submit(pipeline.handle, msg.payload)
                return

    # --- replies ---------------------------------------------------------------------------------

    def _replyable(self, topic: str) -> bool:
        """A reply may not land on a protocol topic (a reply to one's own command topic would
        be read as a command) nor hold wildcards."""
        if self.topics.parse(topic) is None and not any(c in topic for c in "+#"):
            return True
        log.warning("a request asked for its reply on %r; not sent", topic)
        return False

    def reply(self, msg: Incoming, reply_to: str | None, body: Reply | dict[str, Any]) -> None:
        doc = body.model_dump(exclude_none=True) if isinstance(body, Reply) else body
        data = json.dumps(doc, default=str).encode()
        if msg.response_topic:
            if self._replyable(msg.response_topic):
                self.agent.session.publish(
                    msg.response_topic, data, qos=1, correlation_data=msg.correlation_data
                )
        elif reply_to and self._replyable(reply_to):
            self.agent.session.publish(reply_to, data, qos=1)

    def _parse(self, msg: Incoming, model: type[Request], what: str) -> Request | None:
        """The request, or None after answering why it is not one."""
        try:
            request = model.model_validate_json(msg.payload)
        except ValidationError as exc:
            problem = (
                "the payload is not JSON"
                if exc.errors()[0]["type"] == "json_invalid"
                else first_problem(exc, "request")
            )
            error = ProtocolError(f"not a request ({what}): {problem}")
        else:
            if not request.expired():
                return request
            self.reply(
                msg,
                request.reply_to,
                Reply(
                    id=request.id,
                    ok=False,
                    expired=True,
                    error=f"{what} {request.id} expired at {request.expires_at}; dropped",
                ),
            )
            self.agent.record("event", {"event": "expired", "id": request.id, "what": what})
            return None
        raw = _loose(msg.payload)
        reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
        refusal = Reply(
            id=str(raw.get("id", ""))[:128], ok=False, error=str(error), error_type="ProtocolError"
        )
        self.reply(msg, reply_to, refusal)
        self.agent.record(
            "event", {"event": "bad_request", "topic": msg.topic, "error": str(error)}
        )
        return None

    # --- inference -------------------------------------------------------------------------------

    def _infer(self, msg: Incoming, arrived: float | None = None, full: bool = False) -> None:
        limit = self.agent.config.limits.max_payload_bytes  # applied before the payload is parsed
        reply = self.agent.inference.handle_message(msg.payload, limit, arrived, full)
        if reply.event is not None:
            self.agent.record("event", {**reply.event, "topic": msg.topic})
        if reply.body is not None:
            self.reply(msg, reply.reply_to, reply.body)

    # --- commands --------------------------------------------------------------------------------

    def _command(self, msg: Incoming, name: str) -> None:
        model = COMMAND_MODELS.get(name)
        if model is None:
            raw = _loose(msg.payload)
            reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
            known = ", ".join(COMMAND_MODELS)
            self.reply(
                msg,
                reply_to,
                Reply(id=str(raw.get("id", ""))[:128], ok=False, command=name,
                      error=f"unknown command {name!r}; known: {known}",
                      error_type="ProtocolError"),
            )  # fmt: skip
            return
        request = self._parse(msg, model, f"command {name}")
        if request is None:
            return
        first, earlier = self.agent.replies.claim(request.id)
        if not first:
            if earlier is not None:
                self.reply(msg, request.reply_to, {**earlier, "duplicate": True})
            return  # still running: its reply is on the way
        where = commands.WHERE.get(name, "inline")
        if where == "update":
            self.agent.updates.submit(lambda: self._run(msg, name, request))
        elif where == "worker":
            self.command_pool.submit(self._run, msg, name, request)
        else:
            self._run(msg, name, request)

    def _run(self, msg: Incoming, name: str, request: Request) -> None:
        body: dict[str, Any] = {"schema_version": 1, "id": request.id, "command": name}
        try:
            body.update(ok=True, **commands.HANDLERS[name](self.agent, request))
        except EdgebentoError as exc:
            body.update(ok=False, error=redact_text(str(exc)), error_type=type(exc).__name__)
        except Exception as exc:  # a bug must still be answered, and recorded
            log.exception("command %s failed", name)
            error = redact_text(f"internal error: {exc}")
            body.update(ok=False, error=error, error_type="InternalError")
        self.agent.replies.store(request.id, body)
        self.reply(msg, request.reply_to, body)
        self.agent.record(
            "event", {"event": "command", "name": name, "id": request.id, "ok": body["ok"]}
        )

    def shutdown(self) -> None:
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.command_pool.shutdown(wait=True, cancel_futures=True)


def _loose(payload: bytes) -> dict[str, Any]:
    """What can be read of a request that did not validate (for its id and reply_to)."""
    try:
        raw = json.loads(payload)
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) else {}
