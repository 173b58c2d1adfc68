"""The rollout state's writes: each conditional on the etag this controller last wrote or read.

``write(store, etags, key, body)`` creates a document that must not exist yet, or replaces one
that must still be as this controller left it, and records the new etag in ``etags``; a
controller that lost the lease thus cannot overwrite its successor (``ConflictError``).
``write_all`` makes several such writes at once, for the waves of one save.

``check_sequence`` guards a fresh load against a wave put back from an earlier save: each save
has a sequence number, monotonic per rollout, signed into every wave document it writes; the
header records, per wave, the sequence of the document it was written with. Each document
verifies on its own, so without this a bucket writer without the key could put back an older
signed wave (its failures from before they happened, say) and a controller loading the state
would act on it.
"""

from __future__ import annotations

import time

from cloud_sync.object_store import ObjectStore
from modelpack.errors import ConflictError, StoreError


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
