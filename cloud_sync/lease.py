"""A lease in the object store: one rollout controller per fleet (topic prefix) at a time.

``leases/rollout-{prefix}.json`` names the holder and an expiry. It is taken with a create-only
write, renewed and handed over with a compare-and-swap on its etag (S3 ``If-None-Match`` and
``If-Match``; the local store's ``link``/``flock``), so of two controllers exactly one holds it.
A lease past its expiry may be taken over: a controller killed with -9 blocks the fleet for at
most ``ttl_s``. A holder that fails to renew (another took it over after it stalled past the
expiry) gets ``ConflictError`` and must stop publishing.

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


class LeaseDoc(BaseModel):
    schema_version: int = 1
    holder: str
    rollout: str
    prefix: str
    expires_at: float


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
        """Take the fleet's lease, waiting up to ``wait_s`` for a live one to expire."""
        if not ttl_s > 0:  # also NaN: a lease that is expired when taken excludes no one
            raise ConfigError(f"a lease needs a positive time to live, not {ttl_s!r}")
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait_s
        while True:
            doc = LeaseDoc(
                holder=holder, rollout=rollout, prefix=prefix, expires_at=time.time() + ttl_s
            )
            body = doc.model_dump_json().encode()
            try:
                return cls(store, doc, store.create(lease_key(prefix), body), ttl_s)
            except ConflictError:
                pass
            try:
                data, etag = store.read(lease_key(prefix))
            except NotFoundError:
                continue  # released between our two calls
            held = _parse(data)
            if held is None or held.expires_at < time.time():
                try:
                    return cls(store, doc, store.replace(lease_key(prefix), body, etag), ttl_s)
                except ConflictError:
                    continue  # another controller took it over first
            if time.monotonic() >= deadline:
                raise ConflictError(
                    f"the fleet {prefix!r} is leased to rollout {held.rollout} ({held.holder}) "
                    f"for {held.expires_at - time.time():.0f}s more; one controller at a time"
                )
            time.sleep(min(1.0, max(0.05, held.expires_at - time.time())))

    def renew(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._renewed < self.ttl_s / 3:
            return
        self.doc.expires_at = time.time() + self.ttl_s
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
            # Expire it rather than delete it: a delete is not conditional on S3.
            held.expires_at = 0.0
            with contextlib.suppress(ConflictError):  # taken over since: not ours to expire
                self.store.replace(self.key, held.model_dump_json().encode(), etag)


def _parse(data: bytes) -> LeaseDoc | None:
    try:
        return LeaseDoc.model_validate_json(data)
    except ValidationError:
        return None  # an unreadable lease protects nothing: it may be taken over
