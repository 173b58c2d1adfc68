"""A lease in the object store: one rollout controller per fleet (topic prefix) at a time.

``leases/rollout-{prefix}.json`` names the holder, its time to live and a generation. It is taken
with a create-only write, renewed and handed over with a compare-and-swap on its etag (S3
``If-None-Match`` and ``If-Match``; the local store's ``link``/``flock``), so of two controllers
exactly one holds it.

No clock is compared across hosts. A holder renews every ``ttl_s / 3``; a challenger that finds
the lease held watches it on its own monotonic clock: if the lease changes, its holder is alive
(the challenger gives up once ``wait_s`` is spent); if it stays unchanged for the holder's whole
``ttl_s``, its holder is gone and the challenger takes it over, one generation up. A controller
killed with -9 thus blocks the fleet for about ``ttl_s``, whatever the clocks say, and a
controller whose clock runs ahead cannot take a live lease. A holder that stalled past its
``ttl_s`` and was taken over gets ``ConflictError`` at its next renewal, which every state write
of the rollout makes first: it must stop publishing.

Usage::

    lease = Lease.acquire(store, prefix, rollout_id, ttl_s=30, wait_s=0)
    lease.renew()        # cheap when called often: writes only every ttl_s / 3
    lease.release()
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid

from pydantic import BaseModel, ValidationError

from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, ConflictError, NotFoundError

DEFAULT_TTL_S = 30.0


MAX_WATCH_S = 3600.0  # a lease that names a longer time to live is watched this long at most


class LeaseDoc(BaseModel):
    schema_version: int = 2
    holder: str
    rollout: str
    prefix: str
    ttl_s: float = DEFAULT_TTL_S
    generation: int = 1  # one up at each takeover: which holder a write came from
    renewals: int = 0
    released: bool = False
    expires_at: float | None = None  # for people reading the file; never compared


def lease_key(prefix: str) -> str:
    return f"leases/rollout-{prefix.replace('/', '_')}.json"


class Lease:
    def __init__(self, store: ObjectStore, doc: LeaseDoc, etag: str, ttl_s: float) -> None:
        self.store, self.doc, self.etag, self.ttl_s = store, doc, etag, ttl_s
        self.key = lease_key(doc.prefix)
        self._renewed = time.monotonic()

    @classmethod
    def acquire(
        cls,
        store: ObjectStore,
        prefix: str,
        rollout: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
    ) -> Lease:
        """Take the fleet's lease: at once if it is free or released; after watching it stay
        unchanged for its holder's time to live if its holder is gone; ``ConflictError`` once
        ``wait_s`` is spent and the holder has shown it is alive."""
        if not ttl_s > 0:  # also NaN: a lease that is expired when taken excludes no one
            raise ConfigError(f"a lease needs a positive time to live, not {ttl_s!r}")
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        key = lease_key(prefix)
        deadline = time.monotonic() + wait_s
        watched: tuple[str, float] | None = None  # (etag, when first seen) on our own clock
        alive = False  # the holder renewed while we watched
        while True:
            doc = LeaseDoc(holder=holder, rollout=rollout, prefix=prefix, ttl_s=ttl_s)
            doc.expires_at = time.time() + ttl_s
            try:
                return cls(store, doc, store.create(key, doc.model_dump_json().encode()), ttl_s)
            except ConflictError:
                pass
            try:
                data, etag = store.read(key)
            except NotFoundError:
                continue  # released between our two calls
            held = _parse(data)
            now = time.monotonic()
            if watched is not None and watched[0] != etag:
                alive = True
            if watched is None or watched[0] != etag:
                watched = (etag, now)
            held_ttl = min(held.ttl_s, MAX_WATCH_S) if held is not None else 0.0
            if held is None or held.released or now - watched[1] >= held_ttl:
                doc.generation = held.generation + 1 if held is not None else 1
                try:
                    body = doc.model_dump_json().encode()
                    return cls(store, doc, store.replace(key, body, etag), ttl_s)
                except ConflictError:
                    continue  # another controller took it over first
            if now >= deadline and alive:
                raise ConflictError(
                    f"the fleet {prefix!r} is leased to rollout {held.rollout} ({held.holder}), "
                    f"which renews it; one controller at a time"
                )
            time.sleep(min(1.0, max(0.05, held_ttl / 10)))

    def renew(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._renewed < self.ttl_s / 3:
            return
        self.doc.expires_at = time.time() + self.ttl_s
        self.doc.renewals += 1
        try:
            self.etag = self.store.replace(self.key, self.doc.model_dump_json().encode(), self.etag)
        except ConflictError as exc:
            raise ConflictError(
                f"lost the lease of the fleet {self.doc.prefix!r}: another controller took it "
                "over; stopping without publishing more"
            ) from exc
        self._renewed = time.monotonic()

    def release(self) -> None:
        try:
            data, etag = self.store.read(self.key)
        except NotFoundError:
            return
        held = _parse(data)
        if held is not None and held.holder == self.doc.holder:
            # Mark it released rather than delete it: a delete is not conditional on S3.
            held.released = True
            with contextlib.suppress(ConflictError):  # taken over since: not ours to expire
                self.store.replace(self.key, held.model_dump_json().encode(), etag)


def _parse(data: bytes) -> LeaseDoc | None:
    try:
        return LeaseDoc.model_validate_json(data)
    except ValidationError:
        return None  # an unreadable lease protects nothing: it may be taken over
