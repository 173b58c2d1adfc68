"""What a rollout's phases see of the ``Rollout`` that runs them: the drift gate
(``cloud_sync.rollout_drift_gate``) and the shadow phase (``cloud_sync.rollout_shadow``) are
built by ``cloud_sync.rollout`` and handed it, so they name the part of it they use here instead
of importing it back."""

from __future__ import annotations

from typing import Protocol

from cloud_sync.rollout_state import RolloutState
from cloud_sync.watch import FleetWatch


class RolloutView(Protocol):
    @property
    def state(self) -> RolloutState: ...

    def say(self, line: str) -> None:
        """One line of progress for the operator."""


class DriftGateHost(RolloutView, Protocol):
    @property
    def _wave_started(self) -> float:
        """When the wave being judged was pushed (``time.monotonic``)."""


class ShadowHost(RolloutView, Protocol):
    """A shadow phase sends its commands through the rollout's watch and, while it waits for
    figures, keeps the rollout's own loop going: fold statuses, renew the lease, save."""

    @property
    def watch(self) -> FleetWatch: ...

    @property
    def poll_s(self) -> float: ...

    def _drain(self) -> None: ...

    def _save(self, force: bool = False) -> None: ...

    def _tick(self) -> None: ...
