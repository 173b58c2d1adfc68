"""The rollout controller's Prometheus metrics (names from ``docs/metrics.md``):
``edgebento_rollout_phase{rollout, phase}`` is 1 for the current phase and 0 for the others,
``edgebento_rollout_devices{rollout, state}`` counts the devices in each state,
``edgebento_rollout_suspect_devices{rollout}`` the devices whose figures could not be true."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, get_args

from cloud_sync.rollout_state import DeviceState, Phase, RolloutState


class _Scrapes:
    """Counts the scrapes that begin. Registered first, it is collected before the gauges, so a
    scrape counted after an update serves that update's values; the next one to begin means
    Prometheus has its answer (it scrapes a target one scrape at a time)."""

    def __init__(self) -> None:
        self.begun = 0
        self.changed = threading.Condition()

    def collect(self) -> Iterator[Any]:
        with self.changed:
            self.begun += 1
            self.changed.notify_all()
        return iter(())


class RolloutMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.scrapes = _Scrapes()
        self.registry.register(self.scrapes)
        self.updated_at = 0
        self.phase = Gauge(
            "edgebento_rollout_phase",
            "1 for the rollout's current phase",
            ["rollout", "phase"],
            registry=self.registry,
        )
        self.devices = Gauge(
            "edgebento_rollout_devices",
            "devices per state in a rollout",
            ["rollout", "state"],
            registry=self.registry,
        )
        self.suspects = Gauge(
            "edgebento_rollout_suspect_devices",
            "devices whose telemetry claims more than a device can serve (not counted)",
            ["rollout"],
            registry=self.registry,
        )

    def update(self, state: RolloutState) -> None:
        """O(states): the counts are kept by the state as devices move."""
        for phase in get_args(Phase):
            self.phase.labels(state.id, phase).set(1 if phase == state.phase else 0)
        for device_state in get_args(DeviceState):
            self.devices.labels(state.id, device_state).set(state.counts.get(device_state, 0))
        suspects = state.figures.suspects if state.figures is not None else 0
        self.suspects.labels(state.id).set(max(suspects, len(state.suspects)))
        with self.scrapes.changed:
            self.updated_at = self.scrapes.begun  # the scrapes begun after this see it all

    def linger(self, at_most_s: float) -> bool:
        """After the last update: serve until a scrape has taken it, at most ``at_most_s``
        (a short rollout would otherwise end between two scrapes and never be seen)."""
        deadline = time.monotonic() + max(0.0, at_most_s)
        with self.scrapes.changed:
            taken = self.updated_at + 2
            while self.scrapes.begun < taken:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.scrapes.changed.wait(left)
        return True

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
