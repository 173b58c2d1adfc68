"""What an abort tells each device, and how a device's status says it went back.

Import path and API::

    from cloud_sync.rollout_abort import fold_rollback, rollback_desired
    desired = rollback_desired(state, progress, signer)   # None: nothing to go back to
    Published(store)(desired.model)                       # the registry holds it
    fold_rollback(state, progress, status, refused)

Each rollback is ``Desired(model=previous, rollback=True, authorization=...)`` signed for that
device and version (``cloud_sync.authority``), since a device downgrades only on a signed word.
A device is rolled back once its status runs its previous version, and failed when its
``Status.applied`` echoes this rollout's rollback generation with another outcome (a refusal).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cloud_sync.authority import sign_rollback
from cloud_sync.protocol import Desired, ModelRef, Status
from cloud_sync.rollout_checks import same
from cloud_sync.rollout_state import DeviceProgress, RolloutState
from cloud_sync.store import ObjectStore

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def rollback_desired(
    state: RolloutState, progress: DeviceProgress, signer: Ed25519PrivateKey
) -> Desired | None:
    previous = progress.previous
    if previous is None or same(previous, ModelRef(name=state.name, version=state.version)):
        return None
    return Desired(
        model=previous,
        rollout=state.id,
        generation=state.rollback_generation,
        rollback=True,
        authorization=sign_rollback(
            signer,
            progress.device,
            previous,
            generation=state.rollback_generation,
            leaves=ModelRef(name=state.name, version=state.version),
            rollout=state.id,
        ),
    )


class Published:
    """Whether the registry holds a model version (its index and signed manifest agree), once
    per version: what a rollback restores must be a pack the registry vouches for, never only
    what a wave document says a device ran."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._known: dict[tuple[str, int], bool] = {}

    def __call__(self, model: ModelRef | None) -> bool:
        from cloud_sync.registry import Registry
        from modelpack.errors import EdgebentoError

        if model is None:
            return False
        key = (model.name, model.version)
        if key not in self._known:
            try:
                Registry(self.store).entry(model.name, model.version)
                self._known[key] = True
            except EdgebentoError as exc:
                log.warning("no rollback to %s v%s: %s", model.name, model.version, exc)
                self._known[key] = False
        return self._known[key]


def fold_rollback(
    state: RolloutState, progress: DeviceProgress, status: Status, refused: set[str]
) -> None:
    """One status into the progress of a device being rolled back; a refusal joins
    ``refused`` (the abort stops waiting for it)."""
    if progress.state in ("pending", "rolled_back") or progress.previous is None:
        return
    previous = progress.previous
    applied = status.applied
    if same(status.model, previous):
        state.move(progress, "rolled_back", f"runs v{previous.version}")
    elif (
        applied is not None
        and applied.generation == state.rollback_generation
        and applied.rollout == state.id
        and applied.outcome != "installed"
    ):
        refused.add(progress.device)
        state.move(progress, "failed", f"rollback {applied.outcome}: {applied.reason or '?'}")
