"""The rollout state in the store: its layout, the saves and the loads.

Layout: a small header at ``rollouts/{id}.json`` (phase, wave, reason, the figures behind an
abort, counts per device state) and one document per wave at ``rollouts/{id}/wave-{n}.json``.
A save writes the waves that changed since the last save, then the header, so the bytes written
per save are bounded by the waves in flight rather than by the fleet; every document is signed
by the controller's key (``cloud_sync.sealed``) and a load with the key acts only on what it
signed.

``write(store, etags, key, body)`` creates a document that must not exist yet, or replaces one
that must still be as this controller left it, and records the new etag in ``etags``; a
controller that lost the lease thus cannot overwrite its successor (``ConflictError``).
``write_all`` makes several such writes at once, for the waves of one save.

``check_sequence`` guards a fresh load against a wave put back from an earlier save: each save
has a sequence number, monotonic per rollout, signed into every wave document it writes; the
header records, per wave, the sequence of the document it was written with. Each document
verifies on its own, so without this a bucket writer without the key could put back an older
signed wave (its failures from before they happened, say) and a controller loading the state
would act on it. A whole older state, header and waves, is consistent in itself: a state loaded
and saved with a ``SaveRecord`` (``cloud_sync.rollout_record``, on the controller's machine) is
refused when its header is older than the last save recorded there.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cloud_sync.object_store import ObjectStore
from cloud_sync.rollout_record import SaveRecord
from cloud_sync.rollout_state import DeviceProgress, RolloutHeader, RolloutState, WaveDoc
from cloud_sync.sealed import FIELD, parse, seal, seal_json, unseal
from modelpack.errors import ConfigError, ConflictError, NotFoundError, StoreError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelpack.signing import TrustedKey

log = logging.getLogger(__name__)


def write(store: ObjectStore, etags: dict[str, str], key: str, body: bytes) -> float:
    """One conditional write; the CPU seconds it took this thread."""
    cpu_start = time.thread_time()
    etag = etags.get(key)
    try:
        etags[key] = store.replace(key, body, etag) if etag else store.create(key, body)
    except ConflictError as exc:
        raise ConflictError(
            f"{key} was written by someone else since this controller last read or wrote it "
            "(another controller took the fleet over?); stopping without publishing more"
        ) from exc
    return time.thread_time() - cpu_start


def write_all(store: ObjectStore, etags: dict[str, str], bodies: dict[str, bytes]) -> float:
    """The writes at once: each is conditional on its own etag, so they need no order among
    themselves, and a save that changed every wave (the plan, an abort) waits for one round
    trip to the store instead of one per wave. The CPU seconds of all their threads; the first
    failure raises once every write has ended."""
    if len(bodies) < 2:
        return sum(write(store, etags, key, body) for key, body in bodies.items())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(bodies), 8), thread_name_prefix="rollout-save") as pool:
        futures = [pool.submit(write, store, etags, key, body) for key, body in bodies.items()]
    return sum(future.result() for future in futures)


def check_sequence(what: str, seq: int, recorded: int) -> int:
    """``seq``, a wave document's sequence, unless it is older than the one its header records
    (``StoreError``). A newer one is a save that wrote its waves and crashed before its header:
    signed by the controller, and what a resume must carry on from. 0 is unknown (stored before
    sequences), accepted as before, unless the header recorded one since."""
    if seq < recorded:
        raise StoreError(
            f"{what} is from save {seq or 'before sequences'} but the header was written with "
            f"save {recorded}'s: an older wave document put back (replayed or stale); refusing "
            "to act on it"
        )
    return seq


def rollout_key(rollout_id: str) -> str:
    if "/" in rollout_id or rollout_id.startswith(".") or not rollout_id:
        raise ConfigError(f"{rollout_id!r} is not a rollout id")
    return f"rollouts/{rollout_id}.json"


def wave_key(rollout_id: str, wave: int) -> str:
    return f"{rollout_key(rollout_id).removesuffix('.json')}/wave-{wave}.json"


def save_state(store: ObjectStore, state: RolloutState, signer: Ed25519PrivateKey) -> float:
    """Write the changed waves, then the header, each signed by ``signer`` and conditional on
    the etag this controller last saw (``ConflictError`` when another wrote since); the seconds
    it took."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    bodies, state.save_seq = {}, state.save_seq + 1
    seqs = (state.wave_seqs + [0] * state.wave_count)[: state.wave_count]
    for index in sorted(state.take_dirty()):
        seqs[index] = state.save_seq
        doc = WaveDoc(rollout=state.id, wave=index, seq=state.save_seq, devices=state.wave(index))
        # pydantic's Rust serializer, signed as it wrote it: no dict per device (sealed.py).
        bodies[wave_key(state.id, index)] = seal_json(
            doc.model_dump_json(exclude_none=True).encode(), signer
        )
    wave_cpu_s = write_all(store, state._etags, bodies)
    state.wave_seqs = seqs  # the header records which save each wave is from
    state.updated_at = time.time()
    body = seal(state.model_dump(mode="json", exclude={"devices", FIELD}), signer)
    write(store, state._etags, rollout_key(state.id), body)
    if state._record is not None:  # only once the header stands: a crashed save is not one
        state._record.advance(store.url, state.id, state.save_seq)
    elapsed = time.perf_counter() - start
    elsewhere = wave_cpu_s if len(bodies) > 1 else 0.0  # in write_all's threads
    cpu_ms = (time.thread_time() - cpu_start + elsewhere) * 1000
    saves = state.saves
    saves.count += 1
    saves.bytes += sum(map(len, bodies.values())) + len(body)
    saves.requests += len(bodies) + 1
    saves.max_ms = max(saves.max_ms, elapsed * 1000)
    saves.total_ms += elapsed * 1000
    saves.max_cpu_ms = max(saves.max_cpu_ms, cpu_ms)
    saves.total_cpu_ms += cpu_ms
    return elapsed


def _document(data: bytes, trusted: TrustedKey | None, what: str) -> dict[str, Any]:
    """The stored JSON without its signature: verified when ``trusted`` is given (a basis for
    signing), else only parsed (to show)."""
    if trusted is not None:
        return unseal(data, trusted, what)
    doc = parse(data, what)
    doc.pop(FIELD, None)
    return doc


def _load_header(
    store: ObjectStore, rollout_id: str, trusted: TrustedKey | None
) -> tuple[RolloutHeader, str]:
    key = rollout_key(rollout_id)
    try:
        data, etag = store.read(key)
    except NotFoundError as exc:
        raise NotFoundError(f"no rollout {rollout_id} in {store.url}") from exc
    try:
        what = f"rollout {rollout_id} ({key} in {store.url})"
        header = RolloutHeader.model_validate(_document(data, trusted, what))
    except ValidationError as exc:
        raise StoreError(f"rollout {rollout_id} in {store.url} is not a valid state") from exc
    if header.id != rollout_id:  # a header copied under another id would publish as that one
        raise StoreError(f"rollout {rollout_id} in {store.url} names itself {header.id!r}")
    return header, etag


def load_header(
    store: ObjectStore, rollout_id: str, trusted: TrustedKey | None = None
) -> RolloutHeader:
    """The header; its signature checked against ``trusted`` when given (without, only to show:
    never a basis for signing)."""
    return _load_header(store, rollout_id, trusted)[0]


def load_state(
    store: ObjectStore,
    rollout_id: str,
    trusted: TrustedKey | None = None,
    record: SaveRecord | None = None,
) -> RolloutState:
    """The header and every wave; with ``trusted``, each must carry the controller's signature
    over exactly its contents (``SignatureError`` otherwise): what a resume acts on. With
    ``record`` too, a header older than the last save recorded there is refused (a whole older
    state put back), a newer one advances it, and the state's saves go on recording there."""
    if record is not None and trusted is None:
        raise ValueError("only a header verified with the key may move the record of saves")
    header, header_etag = _load_header(store, rollout_id, trusted)
    if record is not None:
        record.accept(store.url, rollout_id, header.save_seq)
    devices: list[DeviceProgress] = []
    etags, seqs = {rollout_key(rollout_id): header_etag}, []
    recorded = header.wave_seqs + [0] * header.wave_count
    for index in range(header.wave_count):
        key = wave_key(rollout_id, index)
        try:
            data, etags[key] = store.read(key)
            doc = WaveDoc.model_validate(_document(data, trusted, f"{key} in {store.url}"))
        except (NotFoundError, ValidationError) as exc:
            raise StoreError(f"rollout {rollout_id}: {key} is missing or not valid") from exc
        if doc.rollout != rollout_id or doc.wave != index:
            raise StoreError(f"rollout {rollout_id}: {key} belongs to another rollout or wave")
        if any(d.wave != index for d in doc.devices):
            raise StoreError(f"rollout {rollout_id}: {key} lists a device of another wave")
        seqs.append(check_sequence(f"rollout {rollout_id}: {key}", doc.seq, recorded[index]))
        devices.extend(doc.devices)
    if len({d.device for d in devices}) != len(devices):
        raise StoreError(f"rollout {rollout_id}: a device is listed twice in its waves")
    fields = header.model_dump(exclude={"wave_count", "counts"})
    state = RolloutState.model_validate({**fields, "devices": devices, "wave_seqs": seqs})
    state.save_seq = max([header.save_seq, *seqs])  # a crashed save's waves may be ahead
    state._etags, state._dirty = etags, {i for i, seq in enumerate(seqs) if not seq}
    state._record = record
    return state


def rollout_ids(store: ObjectStore) -> list[str]:
    """The id of every rollout in the store (one listing, no document read)."""
    return [
        k.removeprefix("rollouts/").removesuffix(".json")
        for k in store.list("rollouts/")
        if k.count("/") == 1 and k.endswith(".json")
    ]


def list_states(store: ObjectStore) -> list[RolloutHeader]:
    """Every rollout's header (the per-device documents are not read)."""
    headers = []
    for rollout_id in rollout_ids(store):
        try:
            headers.append(load_header(store, rollout_id))
        except StoreError as exc:  # one bad document must not hide every other rollout
            log.warning("skipped %s", exc)
    return sorted(headers, key=lambda s: s.created_at)
