"""The agent: one MQTT session, the live model, the updater, telemetry, capture and pipelines."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from cloud_sync.protocol import Desired, Request, Topics
from edge_agent import commands
from edge_agent.capture import Capture
from edge_agent.config import AgentConfig
from edge_agent.inference import InferenceService
from edge_agent.outbox import Outbox
from edge_agent.pipelines import Pipeline
from edge_agent.session import Incoming, Session
from edge_agent.telemetry import Heartbeat, TelemetryPublisher
from edge_agent.updater import Updater
from modelpack.errors import EdgebentoError, ProtocolError

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            config.data_dir / "telemetry.db",
            config.device,
            config.outbox_max_bytes,
            config.outbox_overflow,
        )
        self.boot_id = self.outbox.boot_id
        self.metrics_registry, metrics = self._metrics()
        self.inference = InferenceService(metrics, running=max(1, config.inference_workers))
        self.inference.max_batch = config.limits.max_batch
        self.updater = Updater(config, self.inference, self._on_update)
        self.capture = Capture(
            config.device,
            self.boot_id,
            config.data_dir,
            config.store,
            config.capture_rate,
            config.capture_max_bytes,
            lambda event: self.record("capture", event),
        )
        self.inference.observers.append(self.capture.observe)
        self.replies = commands.ReplyCache(config.data_dir / "commands.db")
        device = config.device
        self.session = Session(
            config,
            will=(self.topics.status(device), self._status_doc("offline")),
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self.telemetry = TelemetryPublisher(
            self.outbox,
            self.session,
            self.topics.telemetry(device),
            config.telemetry_batch,
            lambda: self.config.limits.drain_rate,
        )
        self.heartbeat = Heartbeat()
        self.pipelines = {
            p.input_topic: Pipeline(p, self.inference, self._publish_result)
            for p in config.pipelines
        }
        # Small models answer fastest on the network thread itself (no hand-off between
        # threads); a big model gets workers so the network loop keeps reading and pinging.
        # Updates always run on their own worker, so a slow download never delays an answer.
        workers = config.inference_workers
        self.infer_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="infer")
        self._infer_inline = workers == 0
        self.update_pool = ThreadPoolExecutor(1, thread_name_prefix="update")
        self._stopping = threading.Event()
        self._refused_desired: str | None = None
        self.endpoint: Any = None

    def _metrics(self) -> tuple[Any, Any]:
        if self.config.metrics_port is None:
            return None, None  # prometheus_client stays unimported on devices that do not scrape
        from prometheus_client import CollectorRegistry

        from modelpack.metrics import InferenceMetrics

        registry = CollectorRegistry()
        return registry, InferenceMetrics(registry=registry)

    # --- status and telemetry ------------------------------------------------------------------

    def status_fields(self) -> dict[str, Any]:
        return {
            "device": self.config.device,
            "model": self.inference.model_ref,
            "boot_id": self.boot_id,
            "groups": self.config.groups,
            "last_update": self.updater.last_update,
            "outbox": self.outbox.stats(),
        }

    def _status_doc(self, state: str) -> bytes:
        doc = {"schema_version": 1, "state": state, "ts": time.time(), **self.status_fields()}
        return json.dumps(doc, default=str).encode()

    def publish_status(self) -> None:
        if self.session.connected:
            self.session.publish(
                self.topics.status(self.config.device), self._status_doc("online"), retain=True
            )

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.outbox.append(kind, data)
        self.telemetry.nudge()

    def _on_update(self, event: dict[str, Any]) -> None:
        self.record("update", event)
        self.publish_status()

    def _tick(self) -> None:
        beat = self.heartbeat.sample()
        beat.update(
            model=self.inference.model_ref,
            outbox=self.outbox.stats(),
            connects=self.session.connects,
            capture=self.capture.active,
        )
        self.record("heartbeat", beat)
        self.record("inference", {**self.inference.stats.snapshot(), "model": beat["model"]})

    def apply_limits(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.config.limits = self.config.limits.model_copy(update=changes)
        self.inference.max_batch = self.config.limits.max_batch
        self.record("event", {"event": "config", "changes": changes})
        return self.config.limits.model_dump()

    # --- MQTT ----------------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        t, d = self.topics, self.config.device
        topics = [t.infer(d), t.cmd(d, "+"), t.desired(d)]
        topics += [t.group_cmd(g, "+") for g in self.config.groups]
        return topics + list(self.pipelines)

    def _on_connect(self, session_present: bool) -> None:
        self.publish_status()
        self.telemetry.reconnected()

    def _on_message(self, msg: Incoming) -> None:
        t, device = self.topics, self.config.device
        if msg.topic == t.infer(device):
            if self._infer_inline:
                self._handle_infer(msg)
            else:  # a bounded queue: past it, the request is answered busy at once
                self.inference.submit(self.infer_pool, self._handle_infer, msg, time.monotonic())
        elif msg.topic == t.desired(device):
            if msg.payload:
                self.update_pool.submit(self._reconcile, msg.payload)
        elif msg.topic in self.pipelines:
            self.infer_pool.submit(self.pipelines[msg.topic].handle, msg.payload)
        elif "/cmd/" in msg.topic:
            self._handle_command(msg, msg.topic.rsplit("/", 1)[1])

    def _reply(self, msg: Incoming, reply_to: str | None, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        if msg.response_topic:
            self.session.publish(
                msg.response_topic, data, qos=1, correlation_data=msg.correlation_data
            )
        elif reply_to:
            self.session.publish(reply_to, data, qos=1)

    def _parse(self, msg: Incoming) -> Request | None:
        """The request, or None after answering why it is not one."""
        try:
            return Request.model_validate_json(msg.payload)
        except ValidationError as exc:
            error = ProtocolError(f"not a request: {exc.errors()[0]['msg']}")
        raw: Any = None
        try:
            raw = json.loads(msg.payload)
        except ValueError:
            error = ProtocolError("not a request: the payload is not JSON")
        raw = raw if isinstance(raw, dict) else {}
        reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
        self._reply(
            msg,
            reply_to,
            {"schema_version": 1, "id": str(raw.get("id", "")), "ok": False, "error": str(error)},
        )
        self.record("event", {"event": "bad_request", "topic": msg.topic, "error": str(error)})
        return None

    def _expired(self, msg: Incoming, request: Request, what: str) -> bool:
        if not request.expired():
            return False
        error = f"{what} {request.id} expired at {request.expires_at}; dropped"
        self._reply(
            msg,
            request.reply_to,
            {"schema_version": 1, "id": request.id, "ok": False, "error": error, "expired": True},
        )
        self.record("event", {"event": "expired", "id": request.id, "what": what})
        return True

    def _handle_infer(
        self, msg: Incoming, arrived: float | None = None, full: bool = False
    ) -> None:
        limit = self.config.limits.max_payload_bytes  # applied before the payload is parsed
        reply = self.inference.handle_message(msg.payload, limit, arrived, full)
        if reply.event is not None:
            self.record("event", {**reply.event, "topic": msg.topic})
        if reply.body is not None:
            self._reply(msg, reply.reply_to, reply.body)

    def _handle_command(self, msg: Incoming, name: str) -> None:
        request = self._parse(msg)
        if request is None or self._expired(msg, request, f"command {name}"):
            return
        handler = commands.HANDLERS.get(name)
        if handler is None:
            self._reply(
                msg,
                request.reply_to,
                {
                    "schema_version": 1,
                    "id": request.id,
                    "ok": False,
                    "error": f"unknown command {name!r}; known: {', '.join(commands.HANDLERS)}",
                },
            )
            return
        first, earlier = self.replies.claim(request.id)
        if not first:
            if earlier is not None:
                self._reply(msg, request.reply_to, {**earlier, "duplicate": True})
            return  # still running: its reply is on the way
        if name in commands.SLOW:
            self.update_pool.submit(self._run_command, msg, name, request)
        else:
            self._run_command(msg, name, request)

    def _run_command(self, msg: Incoming, name: str, request: Request) -> None:
        body: dict[str, Any] = {"schema_version": 1, "id": request.id, "command": name}
        try:
            body.update(ok=True, **commands.HANDLERS[name](self, request))
        except EdgebentoError as exc:
            body.update(ok=False, error=str(exc), error_type=type(exc).__name__)
        except Exception as exc:  # a bug must still be answered, and recorded
            log.exception("command %s failed", name)
            body.update(ok=False, error=f"internal error: {exc}", error_type="InternalError")
        self.replies.store(request.id, body)
        self._reply(msg, request.reply_to, body)
        self.record("event", {"event": "command", "name": name, "id": request.id, "ok": body["ok"]})

    def _reconcile(self, payload: bytes) -> None:
        try:
            desired = Desired.model_validate_json(payload)
        except ValidationError as exc:
            self.record("event", {"event": "bad_desired", "error": exc.errors()[0]["msg"]})
            return
        want = desired.model
        current = self.inference.model_ref
        if current is not None and (current.get("name"), current.get("version")) == (
            want.name,
            want.version,
        ):
            return
        key = payload.decode(errors="replace")
        if key == self._refused_desired:
            return  # refused once already this boot; a new desired document will try again
        running = self.updater.current
        downgrade_from = None  # the running version, when the desired one is below it
        if running is not None and running.manifest.name == want.name:
            downgrade_from = (
                running.manifest.version if want.version < running.manifest.version else None
            )
        try:
            if downgrade_from is not None and not desired.rollback:
                self._refused_desired = key
                self.updater.refuse(
                    f"desired {want.name} v{want.version} is lower than the running "
                    f'v{downgrade_from} and not marked "rollback": true; a device never '
                    "downgrades unless told to",
                    "desired",
                    source=f"{want.name} v{want.version}",
                )
                return
            if downgrade_from is not None:
                self.updater.rollback_to(want.name, want.version, desired.url, trigger="desired")
            elif desired.url:
                self.updater.deploy_url(desired.url, trigger="desired")
            else:
                self.updater.deploy_named(want.name, want.version, trigger="desired")
        except EdgebentoError as exc:
            self._refused_desired = key
            log.error("desired %s v%s not installed: %s", want.name, want.version, exc)

    def _publish_result(self, topic: str, payload: bytes) -> None:
        self.session.publish(topic, payload, qos=1)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Agent:
        try:
            self.updater.boot(self.config.pack)
        except EdgebentoError as exc:
            log.error("no model to serve yet: %s", exc)
        for topic in self._subscriptions():
            self.session.subscribe(topic, 1)
        if self.config.metrics_port is not None:
            from edge_agent.http import LocalEndpoint

            self.endpoint = LocalEndpoint(
                self.config.http_host,
                self.config.metrics_port,
                self.inference,
                self.status_fields,
                self.metrics_registry,
                self.config.limits.max_payload_bytes,
            ).start()
        self.session.start()
        self.telemetry.start()
        return self

    def run_forever(self) -> None:
        """Heartbeats until ``request_stop`` or until the broker refused the credentials."""
        next_tick = time.monotonic()
        while not self._stopping.is_set() and self.session.fatal is None:
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.config.limits.telemetry_interval
            self._stopping.wait(min(0.2, max(0.0, next_tick - time.monotonic())))
        fatal = self.session.fatal
        if fatal is not None:
            raise fatal

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self, flush_s: float = 2.0) -> None:
        self._stopping.set()
        if self.session.fatal is None and self.session.connected:
            self.telemetry.flush(flush_s)
        self.telemetry.stop()
        self.session.stop((self.topics.status(self.config.device), self._status_doc("offline")))
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.update_pool.shutdown(wait=True, cancel_futures=True)
        if self.endpoint is not None:
            self.endpoint.stop()
        self.outbox.close()
        self.replies.close()
