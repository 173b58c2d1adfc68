"""Over any run of saves (each changing some waves, some ending before their header as a killed
controller's would, then resumed from the store), every wave document an earlier save wrote and
the header no longer stands behind is refused when put back, and what the last save wrote loads
as the controller left it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.rollout_state import RolloutState
from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.sealed import public_of
from cloud_sync.store import LocalStore
from modelpack.errors import StoreError
from tests.unit.cloud_sync.test_rollout_save_format import SIGNER, _state

TRUSTED = public_of(SIGNER)
STATES = ("updating", "done", "failed", "offline")
# One save: the waves it changes (0-3 of the 4) and whether it ends before its header.
SAVES = st.lists(st.tuples(st.sets(st.integers(0, 3), max_size=4), st.booleans()), max_size=8)


@settings(max_examples=25, deadline=None)
@given(saves=SAVES)
def test_only_the_waves_the_header_stands_behind_or_newer_ones_load(
    saves: list[tuple[set[int], bool]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, state = LocalStore(Path(tmp)), _state(40)
        save_state(store, state, SIGNER)
        written = {i: [store.get_bytes(wave_key(state.id, i))] for i in range(state.wave_count)}
        for step, (waves, crash) in enumerate(saves):
            header = store.get_bytes(rollout_key(state.id))
            for index in waves:
                state.move(state.wave(index)[0], STATES[step % len(STATES)], f"save {step}")
            save_state(store, state, SIGNER)
            for index in waves:
                written[index].append(store.get_bytes(wave_key(state.id, index)))
            if crash:  # the header as before this save: it never got there
                store.put_bytes(rollout_key(state.id), header)
            state = _resumed(store, state)
        save_state(store, state, SIGNER)  # a header that records the waves a crash left newer
        for index, versions in written.items():
            key, current = wave_key(state.id, index), versions[-1]
            for old in versions[:-1]:
                if old == current:
                    continue
                store.put_bytes(key, old)
                with pytest.raises(StoreError, match="replayed or stale"):
                    load_state(store, state.id, TRUSTED)
            store.put_bytes(key, current)
        _resumed(store, state)


def _resumed(store: LocalStore, state: RolloutState) -> RolloutState:
    """A fresh load: every device as the controller last saved it, its sequence ahead of all."""
    loaded = load_state(store, state.id, TRUSTED)
    assert [d.model_dump() for d in loaded.devices] == [d.model_dump() for d in state.devices]
    assert loaded.save_seq >= max(loaded.wave_seqs) and not loaded.dirty
    return loaded
