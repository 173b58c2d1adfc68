"""The rollout state's writes: each conditional on the etag this controller last wrote or read.

``write(store, etags, key, body)`` creates a document that must not exist yet, or replaces one
that must still be as this controller left it, and records the new etag in ``etags``; a
controller that lost the lease thus cannot overwrite its successor (``ConflictError``).
``write_all`` makes several such writes at once, for the waves of one save.
"""

from __future__ import annotations

import time

from cloud_sync.object_store import ObjectStore
from modelpack.errors import ConflictError


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
