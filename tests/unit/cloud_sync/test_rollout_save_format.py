"""The rollout state as a save stores it: each wave is pydantic's JSON of it, signed as written,
with the signature appended as the last field (no dict per device, no second serialization);
states stored indented by the former ``seal`` (signed over canonical JSON) still load, verify
and resume; a changed value, in either layout, is refused."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import ModelRef
from cloud_sync.rollout_state import RolloutState, Thresholds, new_rollout
from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.sealed import FIELD, public_of, seal, seal_json, unseal
from cloud_sync.store import LocalStore
from modelpack.errors import SignatureError
from modelpack.signing import key_id

SIGNER = Ed25519PrivateKey.generate()


def _state(n: int = 300) -> RolloutState:
    devices = [f"sim-{i:05d}" for i in range(n)]
    previous = {d: ModelRef(name="tiny", version=1) for d in devices}
    return new_rollout("tiny", 2, devices, previous, Thresholds(canary_pct=10, waves=3), "p")


def _keys(state: RolloutState) -> list[str]:
    return [rollout_key(state.id)] + [wave_key(state.id, i) for i in range(state.wave_count)]


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_saved_document_is_signed_as_stored_with_the_signature_last(tmp_path: Path) -> None:
    store, state = LocalStore(tmp_path), _state()
    save_state(store, state, SIGNER)
    for key in _keys(state):
        data = store.get_bytes(key)
        doc = json.loads(data)
        assert list(doc)[-1] == FIELD and doc[FIELD]["key"] == key_id(SIGNER.public_key())
        field = json.dumps({FIELD: doc[FIELD]}, separators=(",", ":")).encode()
        signed = data[: len(data) - len(field)] + b"}"
        assert data == signed[:-1] + b"," + field[1:], key
        # The bytes signed are the bytes stored before the signature: nothing re-serialized.
        SIGNER.public_key().verify(base64.b64decode(doc[FIELD]["ed25519"]), signed)
        assert json.loads(signed) == {k: v for k, v in doc.items() if k != FIELD}
    wave = store.get_bytes(wave_key(state.id, 1))
    # Indented, the former format took about 160 bytes a device; compact about 90.
    assert len(wave) / len(state.wave(1)) < 100


def test_a_wave_reformatted_or_edited_by_a_bucket_writer_is_refused(tmp_path: Path) -> None:
    store, state = LocalStore(tmp_path), _state()
    save_state(store, state, SIGNER)
    key = wave_key(state.id, 1)
    data = store.get_bytes(key)
    edited = data.replace(b'"state":"pending"', b'"state":"done"', 1)
    for hostile in (edited, json.dumps(json.loads(data), indent=2).encode()):
        store.put_bytes(key, hostile)
        with pytest.raises(SignatureError, match="changed after the controller signed it"):
            load_state(store, state.id, public_of(SIGNER))
    store.put_bytes(key, data)
    assert load_state(store, state.id, public_of(SIGNER)).counts == state.counts


def _former_seal(doc: dict[str, Any], signer: Ed25519PrivateKey) -> bytes:
    """What ``seal`` wrote before this format: indented, the signature over the canonical JSON."""
    sealed = {k: v for k, v in doc.items() if k != FIELD}
    sealed[FIELD] = {
        "key": key_id(signer.public_key()),
        "ed25519": base64.b64encode(signer.sign(_canonical(doc))).decode(),
    }
    return json.dumps(sealed, indent=2, ensure_ascii=False).encode()


def test_a_state_stored_indented_before_still_loads_and_resumes(tmp_path: Path) -> None:
    store, state = LocalStore(tmp_path), _state()
    save_state(store, state, SIGNER)
    for key in _keys(state):  # rewrite every document as the former seal stored it
        doc = unseal(store.get_bytes(key), public_of(SIGNER), key)
        store.put_bytes(key, _former_seal(doc, SIGNER))
    assert b'\n  "' in store.get_bytes(rollout_key(state.id))
    loaded = load_state(store, state.id, public_of(SIGNER))
    assert [d.model_dump() for d in loaded.devices] == [d.model_dump() for d in state.devices]
    loaded.move(loaded.wave(1)[0], "done", "runs v2")
    save_state(store, loaded, SIGNER)  # conditional on the etags read from the former files
    again = load_state(store, state.id, public_of(SIGNER))
    assert again.device(loaded.wave(1)[0].device).state == "done"
    # A former file that a bucket writer changed is refused as before.
    key = wave_key(state.id, 2)
    former = json.loads(_former_seal(json.loads(store.get_bytes(key)), SIGNER))
    former["devices"][0]["state"] = "done"
    store.put_bytes(key, json.dumps(former, indent=2).encode())
    with pytest.raises(SignatureError, match="changed after the controller signed it"):
        load_state(store, state.id, public_of(SIGNER))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
DOCS = st.dictionaries(st.text().filter(lambda k: k != FIELD), JSON, max_size=6)


@settings(max_examples=150, deadline=None)
@given(doc=DOCS, as_dict=st.booleans(), data=st.data())
def test_sealed_documents_round_trip_and_any_changed_value_is_refused(
    doc: dict[str, Any], as_dict: bool, data: st.DataObject
) -> None:
    # As a dict (canonical JSON) or as JSON bytes written some other way (keys unsorted).
    raw = json.dumps(doc, ensure_ascii=data.draw(st.booleans())).encode()
    body = seal(doc, SIGNER) if as_dict else seal_json(raw, SIGNER)
    assert unseal(body, public_of(SIGNER), "doc") == doc
    if not doc:
        return
    key = data.draw(st.sampled_from(sorted(doc)))
    changed = data.draw(JSON.filter(lambda v: v != doc[key]))
    stored = json.loads(body)
    stored[key] = changed
    for layout in (json.dumps(stored), json.dumps(stored, indent=2, sort_keys=True)):
        with pytest.raises(SignatureError):
            unseal(layout.encode(), public_of(SIGNER), "doc")
