"""A controller that lost the fleet cannot overwrite its successor's rollout state: every save is
conditional on the etag it last wrote or read (issue 19, the lease's fencing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.rollout_state import Thresholds, new_rollout
from cloud_sync.rollout_store import load_state, save_state
from cloud_sync.sealed import public_of
from cloud_sync.store import LocalStore
from modelpack.errors import ConflictError


def test_a_stale_holder_cannot_save_over_its_successor(tmp_path: Path) -> None:
    store, signer = LocalStore(tmp_path), Ed25519PrivateKey.generate()
    stale = new_rollout("m", 2, ["a", "b", "c"], {}, Thresholds(waves=1), "p")
    save_state(store, stale, signer)
    successor = load_state(store, stale.id, public_of(signer))
    successor.phase = "aborting"
    save_state(store, successor, signer)
    stale.move(stale.wave(0)[0], "done", "runs v2")
    with pytest.raises(ConflictError, match="written by someone else"):
        save_state(store, stale, signer)
    assert load_state(store, stale.id, public_of(signer)).phase == "aborting"
    successor.phase = "aborted"
    save_state(store, successor, signer)  # the holder's own saves go on
    # A new rollout never overwrites a document that exists already.
    again = new_rollout("m", 2, ["a"], {}, Thresholds(waves=1), "p")
    again.id = stale.id
    with pytest.raises(ConflictError):
        save_state(store, again, signer)
