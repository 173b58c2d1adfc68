"""The agent: one MQTT session, the live model, the updater, telemetry, capture and pipelines."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_sync.protocol import Topics
from edge_agent.agent_status import AgentStatus
from edge_agent.capture import Capture
from edge_agent.config import AgentConfig
from edge_agent.dispatch import Dispatcher
from edge_agent.drift import DriftCore, DriftMonitor
from edge_agent.heartbeat import Heartbeat
from edge_agent.identity_status import IdentityStatus
from edge_agent.inference import InferenceService
from edge_agent.outbox import Outbox
from edge_agent.packet_limit import TooLarge
from edge_agent.pipelines import Pipeline
from edge_agent.replies import ReplyCache
from edge_agent.session import Session
from edge_agent.telemetry import TelemetryPublisher
from edge_agent.trust import Reconciler
from edge_agent.updater import Updater
from edge_agent.updates import UpdateWorker
from edge_agent.wakeup import Wakeup
from modelpack.errors import EdgebentoError, ExpiredError

if TYPE_CHECKING:
    from edge_agent.shadow import ShadowRunner

log = logging.getLogger(__name__)


class Agent(AgentStatus):
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
        self.updates = UpdateWorker(lambda: self.config.download_deadline_s)
        self.updater = Updater(config, self.inference, self._on_update, self.updates)
        self.drift: DriftMonitor | None = None
        if config.drift_window_s > 0 and isinstance(self.inference.core, DriftCore):
            self.drift = DriftMonitor(
                lambda: self.updater.current,
                config.drift_window_s,
                budget_rows=config.drift_budget_rows,
            )
            self.inference.core.drift = self.drift
        # The shadow runner is built at the first shadow command, or here when a shadow's copy
        # from before a restart is left to clear: a device never asked for one never imports it.
        self._shadow: ShadowRunner | None = None
        if (config.data_dir / "shadow").exists():
            self._shadow = self.shadow
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
        self.replies = ReplyCache(config.data_dir / "commands.db")
        self.identity = IdentityStatus(config.data_dir, config.cert_file)
        self._reported_quarantines: set[Path] = set()
        device = config.device
        self.pipelines = [
            Pipeline(p, self.inference, self._publish_result, self.record) for p in config.pipelines
        ]
        self.dispatcher = Dispatcher(self)
        # What the main loop sleeps on until its next heartbeat: set by a stop (SIGTERM's
        # handler: a Wakeup, which takes no lock), a connect (the status is due) or credentials
        # the broker refused, so each is acted on at once and the loop never polls.
        self._wake = Wakeup()
        self._stopping = threading.Event()
        self._status_due = False  # a connect happened: publish the status
        self.session = Session(
            config,
            will=self._will,
            on_message=self.dispatcher.on_message,
            on_connect=self._on_connect,
            on_fatal=self._wake.set,
        )
        self.telemetry = TelemetryPublisher(
            self.outbox,
            self.session,
            self.topics.telemetry(device),
            config.telemetry_batch,
            lambda: self.config.limits.drain_rate,
            config.telemetry_ack_timeout,
            config.telemetry_window,
        )
        self.updates.desired = Reconciler(self)
        if self.metrics_registry is not None:
            from edge_agent.metrics import AgentCollector

            self.metrics_registry.register(AgentCollector(self))
        self.heartbeat = Heartbeat()
        self._status_at_tick = False
        self.endpoint: Any = None

    def _metrics(self) -> tuple[Any, Any]:
        if self.config.metrics_port is None:
            return None, None  # prometheus_client stays unimported on devices that do not scrape
        from prometheus_client import CollectorRegistry

        from modelpack.metrics import InferenceMetrics

        registry = CollectorRegistry()
        return registry, InferenceMetrics(registry=registry)

    @property
    def shadow(self) -> ShadowRunner:
        """The shadow runner (``edge_agent.shadow``), built at first use: shadow commands run on
        the update worker alone, so one is built once."""
        if self._shadow is None:
            from edge_agent.shadow import ShadowRunner

            runner = ShadowRunner(self.updater, self.inference, self.record, self.publish_status)
            if isinstance(self.inference.core, DriftCore):
                self.inference.core.shadow = runner
            self._shadow = runner
        return self._shadow

    # --- telemetry ----------------------------------------------------------------------------

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
            taken_over=self._taken_over(),  # another client with our client id
            capture=self.capture.active,
        )
        self.record("heartbeat", beat)
        self._stop_serving_if_expired()
        self.record("inference", {**self.inference.stats.snapshot(), "model": beat["model"]})
        if self.drift is not None:
            self.drift.flush_to(self.record)
        if self._shadow is not None:
            self._shadow.flush()
        if self.identity.changed():  # a rotation, or a renewal refused: the status says so
            self.publish_status()

    def _stop_serving_if_expired(self) -> None:
        """With ``refuse_expired``, a pack that expires while it serves stops serving at the
        next heartbeat, as it would at a boot: no model (never an older one below the mark),
        and the status, its last update and ``edgebento_model_expired`` say why."""
        if not self.config.refuse_expired:
            return
        updater = self.updater
        with updater.live:
            pack = updater.current
            if pack is None or not pack.manifest.expired:
                return
            self.inference.unserve()
            updater.current = None
        when = pack.manifest.expires_at
        dirname = updater.read_state().current or pack.root.name
        updater.refuse_expired_pack(dirname, ExpiredError(f"expired at {when}"), "expiry")

    def apply_limits(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.config.limits = self.config.limits.model_copy(update=changes)
        self.inference.max_batch = self.config.limits.max_batch
        self.record("event", {"event": "config", "changes": changes})
        return self.config.limits.model_dump()

    def report_quarantines(self) -> None:
        """Each local state file found corrupt and renamed aside, once, as an event."""
        for aside in [*self.outbox.quarantined, *self.replies.quarantined]:
            if aside not in self._reported_quarantines:
                self._reported_quarantines.add(aside)
                self.record("event", {"event": "state_quarantined", "file": aside.name})

    # --- MQTT ----------------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        # Not from inside paho's on_connect: paho resends what the last broker never
        # acknowledged (a status from before it died, say) only after this returns, and that
        # older status would then be the one retained. The main loop publishes it next, and
        # again at the next heartbeat, after any resend.
        self._status_due = True
        self._status_at_tick = True
        self._wake.set()
        self.telemetry.reconnected()

    def _publish_result(self, topic: str, payload: bytes, not_sent: TooLarge) -> None:
        self.session.publish(topic, payload, qos=1, on_too_large=not_sent)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Agent:
        try:
            self.updater.boot(self.config.pack)
        except EdgebentoError as exc:
            log.error("no model to serve yet: %s", exc)
        self.report_quarantines()
        for topic in self.dispatcher.subscriptions():
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
                self.config.http,
            ).start()
        self.session.start()
        self.telemetry.start()
        return self

    def run_forever(self) -> None:
        """Heartbeats until ``request_stop`` or until the broker refused the credentials."""
        next_tick = time.monotonic()
        while not self._stopping.is_set() and self.session.fatal is None:
            if self._status_due:
                self._status_due = False
                self.publish_status()
            if time.monotonic() >= next_tick:
                if self._status_at_tick:
                    self._status_at_tick = False
                    self.publish_status()
                try:
                    self._tick()
                    self.report_quarantines()
                except Exception:  # a heartbeat that fails must not end the agent
                    log.exception("heartbeat failed")
                next_tick = time.monotonic() + self.config.limits.telemetry_interval
            # A set after the wait returns wakes the next one: none is lost.
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
        fatal = self.session.fatal
        if fatal is not None:
            raise fatal

    def request_stop(self) -> None:
        """Ends ``run_forever`` at once (a signal handler calls it): the loop is woken, not
        left to find out at its next heartbeat."""
        self._stopping.set()
        self._wake.set()

    def stop(self, flush_s: float = 2.0) -> None:
        """A clean stop: waits at most ``flush_s`` for the ingestion to acknowledge the last
        telemetry, and only while its acknowledgements come (``TelemetryPublisher.flush``);
        what it does not acknowledge stays in the outbox for the next start."""
        self.request_stop()
        log.info("shutting down: serving %s", self.serving_label())
        if self.drift is not None:
            self.drift.flush_to(self.record, force=True)  # the window so far, kept in the outbox
        if self.session.fatal is None and self.session.connected:
            self.telemetry.flush(flush_s)
        self.telemetry.stop()
        self.session.stop((self.topics.status(self.config.device), self._status_doc("offline")))
        self.updates.shutdown()
        self.dispatcher.shutdown()
        if self.endpoint is not None:
            self.endpoint.stop()
        kept = self.outbox.count  # unacknowledged: sent at the next start, never dropped
        self.outbox.close()
        self.replies.close()
        self._wake.close()
        log.info("stopped; %d telemetry records kept on disk for the next start", kept)
