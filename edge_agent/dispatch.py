"""Routing a device's MQTT messages, and building the replies: topics parsed exactly.

A message is for this device only when its topic is exactly one of the device's own
(``{prefix}/{device}/cmd/{name}``, ``.../infer``, ``.../desired``, ``.../telemetry/ack``) or a
command of a group the device is in; anything else goes to the pipeline whose filter matches it
(pipelines may not overlap the device's topics: refused when the config is loaded), and is
otherwise ignored. Requests are parsed with the protocol's models, answered on the MQTT 5
response topic or the request's ``reply_to``, and a command runs at most once per ``id``.

A reply topic is checked before the request runs: one the broker would drop the device for
(``cloud_sync.protocol.topic_name_problem``), one of the broker's own ``$`` topics, a protocol
topic (a reply there would be read as a command) or a pipeline's input is never used; the request
is not run, is answered nowhere and is counted (``unanswered`` events, reason ``reply_topic``).
An answer over the broker's packet limit is replaced by a short refusal (``too_large``), also one
that an MQTT 3.1.1 broker dropped the connection for (``edge_agent.packet_limit``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from cloud_sync.protocol import COMMAND_MODELS, Reply, Request, topic_name_problem
from cloud_sync.redact import redact_text
from edge_agent import commands
from edge_agent.incoming import Incoming
from edge_agent.infer_topic import InferTopic
from edge_agent.inference import install_hint
from edge_agent.ports import DispatchHost
from modelpack import untrusted_json
from modelpack.codec import dumps
from modelpack.errors import (
    MAX_MESSAGE_CHARS,
    BrokerError,
    EdgebentoError,
    InputError,
    ProtocolError,
    clip,
    first_problem,
)

if TYPE_CHECKING:
    from edge_agent.pipelines import Pipeline

log = logging.getLogger(__name__)

MAX_REMEMBERED_TOPICS = 256
MAX_REMEMBERED_TOPIC = 512  # characters, as ``Request.reply_to``


class Dispatcher:
    def __init__(self, agent: DispatchHost) -> None:
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
        self.infer_topic = InferTopic(agent.inference)
        agent.inference.install_hint = install_hint(agent.config.prefix, self.device)
        self.unanswered: dict[str, int] = {}  # requests answered nowhere, by reason
        # Reply topics found usable: what decides it (the prefix, the pipelines, the topic
        # limit) is fixed for the agent's life, and a client sends the same few topics again.
        self._usable: set[str] = set()

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
                # The infer topic's queue, cap and deadline, from arrival; always on a worker,
                # so the network thread takes readings as they come and times them truly.
                arrived = time.monotonic()
                limit = agent.config.limits.max_payload_bytes
                if pipeline.oversized(msg.payload, limit):  # refused before it is queued or read
                    return
                agent.inference.submit(self.infer_pool, _reading(pipeline, limit), msg, arrived)
                return

    # --- replies ---------------------------------------------------------------------------------

    def reply_problem(self, topic: str | None) -> str | None:
        """Why a reply may not go to ``topic``, or None."""
        if topic is None or topic in self._usable:
            return None
        problem = self._problem(topic)
        if problem is None and len(topic) <= MAX_REMEMBERED_TOPIC:
            if len(self._usable) >= MAX_REMEMBERED_TOPICS:  # a client making up topics
                self._usable.clear()
            self._usable.add(topic)
        return problem

    def _problem(self, topic: str) -> str | None:
        problem = topic_name_problem(topic, self.agent.config.max_topic_bytes)
        if problem is not None:
            return problem
        if topic.startswith("$"):
            return "it is one of the broker's own ($) topics"
        if self.topics.parse(topic) is not None:  # a reply there would be read as a command
            return "it is one of the protocol's topics"
        for pipeline in self.agent.pipelines:
            if mqtt.topic_matches_sub(pipeline.config.input_topic, topic):
                return f"it is the input of pipeline {pipeline.config.name!r}"
        return None

    def _checker(self, msg: Incoming) -> Callable[[str | None], str | None]:
        """What a request's own ``reply_to`` is checked with (the response topic, which takes
        precedence, is checked before the request is read)."""
        if msg.response_topic:
            return lambda reply_to: None
        return self.reply_problem

    def _unanswered(self, msg: Incoming, reason: str, error: str, request_id: Any = None) -> None:
        count = self.unanswered[reason] = self.unanswered.get(reason, 0) + 1
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood cannot flood the log
            log.warning("request %d on %s answered nowhere: %s", count, msg.topic, error)
        event = {"event": "unanswered", "reason": reason, "topic": msg.topic, "error": error}
        if isinstance(request_id, str):
            event["id"] = request_id[:128]
        self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        """An event for the telemetry outbox, each text in it clipped: a request's topic and
        the refusals that quote what a client sent are named, never copied whole."""
        self.agent.record("event", bounded(event))

    def reply(self, msg: Incoming, reply_to: str | None, body: Reply | dict[str, Any]) -> None:
        topic = msg.response_topic or reply_to
        if not topic:
            return
        doc = body.model_dump(exclude_none=True) if isinstance(body, Reply) else body
        problem = self.reply_problem(topic)
        if problem is not None:
            self._unanswered(msg, "reply_topic", f"the reply topic cannot be used: {problem}",
                             doc.get("id"))  # fmt: skip
            return
        data = _encode(doc)
        session = self.agent.session
        small: dict[str, Any] = {k: doc[k] for k in ("schema_version", "id", "command") if k in doc}
        try:  # publish checks the topic and size itself: the usual answer is checked once
            too_large = functools.partial(self._too_large, msg, topic, small)
            session.publish(topic, data, 1, correlation_data=msg.correlation_data,
                            on_too_large=too_large)  # fmt: skip
            return
        except BrokerError as exc:  # too big for the broker: a short refusal instead
            refused = session.refusal(topic, data, msg.correlation_data) or str(exc)
        self._too_large(msg, topic, small, refused)

    def _too_large(self, msg: Incoming, topic: str, small: dict[str, Any], refused: str) -> None:
        """A short refusal in place of an answer over the broker's packet limit: known before
        it was sent, or learned when an MQTT 3.1.1 broker dropped the connection for it."""
        self._unanswered(msg, "too_large", refused, small.get("id"))
        body = {**small, "ok": False, "error": f"the answer is not sent: {refused}"}
        data = _encode({**body, "reason": "too_large"})
        session = self.agent.session
        if session.refusal(topic, data, msg.correlation_data) is None:
            session.publish(topic, data, qos=1, correlation_data=msg.correlation_data)

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
            self._record({"event": "expired", "id": request.id, "what": what})
            return None
        raw = _loose(msg.payload)
        reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
        refusal = Reply(
            id=str(raw.get("id", ""))[:128], ok=False, error=str(error), error_type="ProtocolError"
        )
        self.reply(msg, reply_to, refusal)
        self._record({"event": "bad_request", "topic": msg.topic, "error": str(error)})
        return None

    # --- inference -------------------------------------------------------------------------------

    def _infer(self, msg: Incoming, arrived: float | None = None, full: bool = False) -> None:
        arrived = time.monotonic() if arrived is None else arrived
        problem = self.reply_problem(msg.response_topic)
        if problem is not None:  # not read, not run
            error = f"the reply topic cannot be used: {problem}"
            self.agent.inference.core.count_error(InputError(error, reason="reply_topic"))
            self._unanswered(msg, "reply_topic", error)
            return
        limit = self.agent.config.limits.max_payload_bytes  # applied before the payload is parsed
        reply = self.infer_topic.handle(msg.payload, limit, arrived, full, self._checker(msg))
        if reply.event is not None:
            if reply.event.get("event") == "unanswered":
                error, request_id = str(reply.event.get("error")), reply.event.get("id")
                self._unanswered(msg, "reply_topic", error, request_id)
            else:
                self._record({**reply.event, "topic": msg.topic})
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
                Reply(id=str(raw.get("id", ""))[:128], ok=False, command=clip(name),
                      error=f"unknown command {clip(repr(name))}; known: {known}",
                      error_type="ProtocolError"),
            )  # fmt: skip
            return
        request = self._parse(msg, model, f"command {name}")
        if request is None:
            return
        problem = self.reply_problem(msg.response_topic or request.reply_to)
        if problem is not None:  # not run: its outcome could be told to no one
            error = f"the reply topic cannot be used: {problem}"
            self._unanswered(msg, "reply_topic", error, request.id)
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
            error = clip(redact_text(str(exc)), MAX_MESSAGE_CHARS)
            body.update(ok=False, error=error, error_type=type(exc).__name__)
        except Exception as exc:  # a bug must still be answered, and recorded
            log.exception("command %s failed", name)
            error = clip(redact_text(f"internal error: {exc}"), MAX_MESSAGE_CHARS)
            body.update(ok=False, error=error, error_type="InternalError")
        self.agent.replies.store(request.id, body)
        self.reply(msg, request.reply_to, body)
        self._record({"event": "command", "name": name, "id": request.id, "ok": body["ok"]})

    def shutdown(self) -> None:
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.command_pool.shutdown(wait=True, cancel_futures=True)


def bounded(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with each text value clipped to ``MAX_MESSAGE_CHARS`` (``modelpack.errors.clip``).
    An event holds no more than a few such values, so its record stays a few KiB at most."""
    return {k: clip(v, MAX_MESSAGE_CHARS) if isinstance(v, str) else v for k, v in event.items()}


def _reading(pipeline: Pipeline, limit: int) -> Callable[[Incoming, float, bool], None]:
    def handle(msg: Incoming, arrived: float, full: bool) -> None:
        pipeline.handle(msg.payload, limit, arrived, full)

    return handle


def _encode(doc: dict[str, Any]) -> bytes:
    """An inference answer through the codec's one encoder (float32 with 9 significant
    digits); a command's reply may hold values JSON has no type for (a path), written as text."""
    try:
        return dumps(doc)
    except (TypeError, ValueError):
        return json.dumps(doc, default=str).encode()


def _loose(payload: bytes) -> dict[str, Any]:
    """What can be read of a request that did not validate (for its id and reply_to)."""
    try:
        raw = untrusted_json.loads(payload)
    except untrusted_json.NotJsonError:  # nested too deep or a 5,000-digit id: no id to tell
        return {}
    return raw if isinstance(raw, dict) else {}
