"""The rollout controller's Prometheus metrics (names from ``docs/metrics.md``):
``edgebento_rollout_phase{rollout, phase}`` is 1 for the current phase and 0 for the others,
``edgebento_rollout_devices{rollout, state}`` counts the devices in each state,
``edgebento_rollout_suspect_devices{rollout}`` the devices whose figures could not be true."""

from __future__ import annotations

from typing import get_args

from cloud_sync.rollout_state import DeviceState, Phase, RolloutState


class RolloutMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
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

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
