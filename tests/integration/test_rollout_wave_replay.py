"""A wave document put back from an earlier save of the same rollout, against moto's S3 server
through real boto3 calls: it carries the controller's signature (each document verifies on its
own), so only the save sequence the header records for it shows that it is older. A fresh load
refuses it; a newer wave (a save that crashed before its header) is what a resume carries on
from; a state stored before sequences loads as before, and its first save sequences every
wave."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloud_sync.rollout_state import RolloutState
from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.s3store import S3Store
from cloud_sync.sealed import FIELD, public_of, seal, seal_json, unseal
from modelpack.errors import StoreError
from tests.integration import test_rollout_save_requests as save_requests
from tests.unit.cloud_sync.test_rollout_save_format import SIGNER, _state

TRUSTED = public_of(SIGNER)
store = save_requests.store  # the moto S3 server's bucket, through S3Store (boto3)


def _fresh(store: S3Store) -> S3Store:
    """Another controller's client on the same bucket: nothing cached from the saves."""
    return S3Store(store.bucket, "p", endpoint_url=store.client.meta.endpoint_url)


def _get(store: S3Store, key: str) -> bytes:
    body: bytes = store.client.get_object(Bucket=store.bucket, Key=f"p/{key}")["Body"].read()
    return body


def _put_back(store: S3Store, key: str, data: bytes) -> None:
    """What a bucket writer without the key can do: put back bytes the controller once wrote."""
    store.client.put_object(Bucket=store.bucket, Key=f"p/{key}", Body=data)


def _fail(state: RolloutState) -> str:
    device = state.wave(1)[0]
    state.move(device, "failed", "crashed on load")
    return device.device


def test_an_older_wave_put_back_is_refused_on_a_fresh_load(store: S3Store) -> None:
    state = _state(60)
    save_state(store, state, SIGNER)
    key = wave_key(state.id, 1)
    before = _get(store, key)
    failed = _fail(state)
    save_state(store, state, SIGNER)
    assert load_state(_fresh(store), state.id, TRUSTED).device(failed).state == "failed"

    _put_back(store, key, before)
    old = unseal(_get(store, key), TRUSTED, key)  # signed: it verifies on its own
    assert [d["state"] for d in old["devices"] if d["device"] == failed] == ["pending"]
    with pytest.raises(StoreError, match=r"wave-1\.json is from save 1 .* save 2's.*replayed"):
        load_state(_fresh(store), state.id, TRUSTED)


def test_a_save_that_crashed_before_its_header_resumes_from_its_waves(store: S3Store) -> None:
    state = _state(60)
    save_state(store, state, SIGNER)
    header, before = _get(store, rollout_key(state.id)), _get(store, wave_key(state.id, 1))
    failed = _fail(state)

    def crash(request: Any, **_kw: Any) -> None:
        if request.url.split("?", 1)[0].endswith(rollout_key(state.id)):
            raise RuntimeError("controller killed before its header")

    store.client.meta.events.register("before-send.s3.PutObject", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save_state(store, state, SIGNER)
    assert _get(store, rollout_key(state.id)) == header  # the waves were written, not the header

    resumed = load_state(_fresh(store), state.id, TRUSTED)  # wave 1 is newer than the header's
    assert resumed.device(failed).state == "failed"
    assert (resumed.save_seq, resumed.wave_seqs, resumed.dirty) == (2, [1, 2, 1, 1], False)
    resumed.move(resumed.wave(2)[0], "done", "runs v2")
    save_state(_fresh(store), resumed, SIGNER)  # conditional on the etags it read
    again = load_state(_fresh(store), state.id, TRUSTED)
    assert (again.save_seq, again.wave_seqs) == (3, [1, 2, 3, 1])
    assert again.device(failed).state == "failed"
    # The header now records the crashed save's wave: the one from before it is refused.
    _put_back(store, wave_key(state.id, 1), before)
    with pytest.raises(StoreError, match="replayed or stale"):
        load_state(_fresh(store), state.id, TRUSTED)


def _unsequenced(store: S3Store, state: RolloutState) -> dict[str, bytes]:
    """Rewrite the stored state as saves before sequences wrote it, signed by the same key."""
    header = unseal(_get(store, rollout_key(state.id)), TRUSTED, "header")
    for name in ("save_seq", "wave_seqs"):
        del header[name]
    former = {rollout_key(state.id): seal(header, SIGNER)}
    for index in range(state.wave_count):
        doc = unseal(_get(store, wave_key(state.id, index)), TRUSTED, "wave")
        del doc["seq"]
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        former[wave_key(state.id, index)] = seal_json(body, SIGNER)
    for key, data in former.items():
        assert b'"seq' not in data.split(f'"{FIELD}"'.encode())[0], key
        _put_back(store, key, data)
    return former


def test_a_state_stored_before_sequences_loads_and_its_first_save_sequences_it(
    store: S3Store,
) -> None:
    state = _state(60)
    save_state(store, state, SIGNER)
    former = _unsequenced(store, state)
    loaded = load_state(_fresh(store), state.id, TRUSTED)  # unknown sequences: accepted
    assert [d.model_dump() for d in loaded.devices] == [d.model_dump() for d in state.devices]
    assert (loaded.save_seq, loaded.wave_seqs, loaded.dirty) == (0, [0, 0, 0, 0], True)
    failed = _fail(loaded)
    save_state(_fresh(store), loaded, SIGNER)  # every wave, so each has a sequence from now on
    again = load_state(_fresh(store), state.id, TRUSTED)
    assert (again.save_seq, again.wave_seqs) == (1, [1, 1, 1, 1])
    assert again.device(failed).state == "failed"
    _put_back(store, wave_key(state.id, 1), former[wave_key(state.id, 1)])
    with pytest.raises(StoreError, match=r"from save before sequences .* save 1's"):
        load_state(_fresh(store), state.id, TRUSTED)
