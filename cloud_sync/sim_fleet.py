"""Thousands of simulated devices (``cloud_sync.simulator``), each on its own MQTT connection,
driven by one thread: paho clients on an external ``selectors`` loop instead of a network
thread per client, so 5,000 devices cost one process and 5,000 sockets.

Import path and API::

    from cloud_sync.sim_fleet import SimFleet
    with SimFleet(broker_url, [f"sim-{i}" for i in range(1000)], ModelRef(name="det", version=1),
                  behavior=Behavior(), trusted=[...]) as fleet:
        fleet.run(until=lambda: stop.is_set())

Each device needs a file descriptor here and one in the broker: ``raise_fd_limit`` lifts the
soft limit to the hard one, and refuses a fleet that does not fit.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import resource
import selectors
import time
from collections.abc import Callable
from typing import Any

from cloud_sync.mqtt import parse_broker_url
from cloud_sync.protocol import ModelRef, Status, Topics
from cloud_sync.rollout_state import check_device_ids
from cloud_sync.simulator import Behavior, SimDevice
from modelpack.errors import BrokerError, ConfigError
from modelpack.signing import TrustedKey

log = logging.getLogger(__name__)
RECONNECT_S = 5.0
CONNECT_BATCH = 200  # connections opened before the loop answers their CONNACKs
FD_HEADROOM = 64


def check_fleet(devices: list[str], prefix: str) -> None:
    """Refuse ids and a prefix that would not give each device topics of its own."""
    check_device_ids(devices)
    if len(set(devices)) != len(devices):
        raise ConfigError(
            f"the device ids repeat ({devices[0]!r}, ...): give --id a format with one number"
        )
    if not prefix or any(c in prefix for c in "+#\0") or "" in prefix.split("/"):
        raise ConfigError(f"topic prefix {prefix!r} must be topic levels without + or #")


def raise_fd_limit(devices: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = devices + FD_HEADROOM
    if soft < need <= hard or (hard == resource.RLIM_INFINITY and soft < need):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    if soft < need:
        raise ConfigError(
            f"{devices} simulated devices need {need} file descriptors; the limit is {hard} "
            "(raise it with ulimit -n, for the broker too)"
        )
    return soft


class SimFleet:
    def __init__(
        self,
        broker_url: str,
        devices: list[str],
        model: ModelRef,
        *,
        topics: Topics | None = None,
        behavior: Behavior | None = None,
        trusted: list[TrustedKey] | None = None,
    ) -> None:
        self.topics = topics or Topics()
        check_fleet(devices, self.topics.prefix)
        raise_fd_limit(len(devices))
        self.address = parse_broker_url(broker_url)
        self.behavior = behavior or Behavior()
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.writers: set[Any] = set()
        self.clients: dict[str, Any] = {}
        self.sims: dict[str, SimDevice] = {}
        self.connected: set[str] = set()
        self.started = False  # connect() is done: from then on, lost devices reconnect
        self._misc_at = 0.0
        self._reconnect_at = 0.0
        for device in devices:
            self.sims[device] = SimDevice(
                device,
                model,
                self.topics,
                self.behavior,
                trusted or [],
                self._publisher(device),
                self.schedule,
            )

    # --- plumbing ----------------------------------------------------------------------------

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay_s, next(self._order), action))

    def _publisher(self, device: str) -> Callable[[str, bytes, int, bool], None]:
        def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            client = self.clients.get(device)
            if client is not None:
                client.publish(topic, payload, qos=qos, retain=retain)

        return publish

    def _client(self, device: str) -> Any:
        import paho.mqtt.client as mqtt

        sim = self.sims[device]
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sim-{device}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if self.address.username:
            client.username_pw_set(self.address.username, self.address.password)
        offline = Status(device=device, state="offline", model=sim.model, boot_id=sim.boot_id)
        client.will_set(self.topics.status(device), offline.model_dump_json(), qos=1, retain=True)

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.warning("%s: the broker refused us: %s", device, reason)
                return
            c.subscribe(
                [
                    (self.topics.desired(device), 1),
                    (self.topics.telemetry_ack(device), 1),
                    (self.topics.cmd(device, "shadow"), 1),
                ]
            )
            self.connected.add(device)
            # Reported on the loop's next turn, not here: paho resends what the broker had not
            # acknowledged (the status of the last connect, if the broker died first) only after
            # this callback, and the stale one would then be the status the broker retains.
            self.schedule(0.0, sim.on_connect)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            try:
                sim.on_message(msg.topic, bytes(msg.payload))
            except Exception:  # one device's bug must not stop the fleet's loop
                log.exception("%s: dropped a message on %s", device, msg.topic)

        def on_disconnect(*_args: Any) -> None:
            self.connected.discard(device)

        client.on_connect = on_connect
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        client.on_socket_open = lambda c, _u, sock: self._watch(sock, c)
        client.on_socket_close = lambda c, _u, sock: self._forget(sock, c)
        client.on_socket_register_write = lambda c, _u, _s: self.writers.add(c)
        client.on_socket_unregister_write = lambda c, _u, _s: self.writers.discard(c)
        return client

    def _watch(self, sock: Any, client: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _forget(self, sock: Any, client: Any) -> None:
        self.writers.discard(client)
        with contextlib.suppress(KeyError, ValueError):  # closed before it was registered
            self.selector.unregister(sock)

    # --- running -----------------------------------------------------------------------------

    def connect(self, timeout_s: float = 120.0) -> None:
        """Open every device's connection; return once all are connected and reported."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.sims)
        while pending:
            batch, pending = pending[:CONNECT_BATCH], pending[CONNECT_BATCH:]
            for device in batch:
                client = self._client(device)
                self.clients[device] = client
                try:
                    client.connect(self.address.host, self.address.port, keepalive=60)
                except OSError as exc:
                    raise BrokerError(f"{device} cannot reach the broker: {exc}") from exc
            while len(self.connected) < len(self.clients) and time.monotonic() < deadline:
                self.step(0.05)
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"only {len(self.connected)} of {len(self.sims)} devices connected"
                )
        self.step(0.0)  # the statuses of the last connects, scheduled by on_connect
        self.started = True
        if self.behavior.telemetry_s > 0:
            for i, sim in enumerate(self.sims.values()):
                # Spread the fleet's windows over the interval, as real devices drift apart.
                offset = self.behavior.telemetry_s * i / len(self.sims)
                self._telemetry_every(sim, offset)

    def _telemetry_every(self, sim: SimDevice, delay_s: float) -> None:
        def tick() -> None:
            if sim.device in self.connected:
                sim.tick_telemetry()
            self._telemetry_every(sim, self.behavior.telemetry_s)

        self.schedule(delay_s, tick)

    def step(self, timeout_s: float) -> None:
        """One turn of the loop: due timers, readable sockets, pending writes, keepalives."""
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, action = heapq.heappop(self.timers)
            action()
        wait = timeout_s
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - now))
        for key, _events in self.selector.select(wait):
            key.data.loop_read()
        for client in list(self.writers):
            client.loop_write()
        if now - self._misc_at >= 1.0:
            self._misc_at = now
            for client in self.clients.values():
                client.loop_misc()
        if self.started and now - self._reconnect_at >= RECONNECT_S:
            self._reconnect_at = now
            self._reconnect()

    def _reconnect(self) -> None:
        """Devices that lost the broker (it restarted, or dropped them) connect again, as
        agents do; their on_connect subscribes and reports anew."""
        for device, client in self.clients.items():
            if device in self.connected:
                continue
            try:
                client.reconnect()
            except OSError:
                return  # the broker is still away: try again later, all of them

    def run(self, until: Callable[[], bool]) -> None:
        while not until():
            self.step(0.1)

    def close(self) -> None:
        """Disconnect cleanly: a clean DISCONNECT suppresses the will, so mark offline first."""
        self.started = False
        for device, sim in self.sims.items():
            client = self.clients.get(device)
            if client is not None and device in self.connected:
                client.publish(self.topics.status(device), sim.status("offline"), 1, True)
        for _ in range(20):
            self.step(0.05)
        for client in self.clients.values():
            client.disconnect()
        for _ in range(10):
            self.step(0.02)
        self.selector.close()

    def __enter__(self) -> SimFleet:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
