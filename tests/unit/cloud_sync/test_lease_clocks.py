"""The fleet lease compares no clocks across hosts (issue 19, finding 8).

On main a controller whose clock ran 45 s ahead took a live lease (the holder lost it while
running), and one 120 s behind was blocked for 111 s after the holder was killed. Here each
controller's ``time.time`` is skewed by ±120 s or +45 s: nothing changes, because a challenger
decides on what it watches of the lease on its own monotonic clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.lease import Lease, LeaseDoc, lease_key
from cloud_sync.store import LocalStore
from modelpack.errors import ConflictError

TTL = 1.0


class Renewing:
    """A live holder: renews on its own thread as a rollout's loop does."""

    def __init__(self, lease: Lease) -> None:
        self.lease, self.stop, self.lost = lease, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.lease.ttl_s / 10):
            try:
                self.lease.renew()
            except ConflictError:
                self.lost.set()
                return

    def kill(self) -> None:
        """kill -9: it stops renewing and never releases."""
        self.stop.set()
        self.thread.join()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path)


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Shift this process's wall clock (every lease call reads it through the time module)."""
    offset = [0.0]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    yield offset


class RenewedBetweenReads(LocalStore):
    """The challenger's view of a live holder, on any machine load: the holder renews before
    each of the challenger's reads (a thread renewing on a timer can be starved for a TTL on a
    busy machine, and a starved holder rightly loses its lease)."""

    def __init__(self, root: Path, holder: Lease, skew: list[float]) -> None:
        super().__init__(root)
        self.holder, self.skew = holder, skew

    def read(self, key: str) -> tuple[bytes, str]:
        challenger_skew, self.skew[0] = self.skew[0], 0.0  # the holder's host: its own clock
        try:
            self.holder.renew(force=True)
        finally:
            self.skew[0] = challenger_skew
        return super().read(key)


@pytest.mark.parametrize("ahead", [45.0, 120.0, -120.0])
def test_a_skewed_challenger_cannot_take_a_live_lease(
    store: LocalStore, skew: list[float], ahead: float
) -> None:
    holder = Lease.acquire(store, "fleet", "r1", ttl_s=TTL)
    skew[0] = ahead
    challenger_view = RenewedBetweenReads(store.root, holder, skew)
    with pytest.raises(ConflictError, match="leased to rollout r1"):
        Lease.acquire(challenger_view, "fleet", "r2", ttl_s=TTL, wait_s=2 * TTL)
    holder.renew(force=True)  # the holder still holds it: its conditional write succeeds
    holder.release()


@pytest.mark.parametrize("behind", [-120.0, 120.0])
def test_a_killed_holder_blocks_the_fleet_for_its_ttl_whatever_the_clocks(
    store: LocalStore, skew: list[float], behind: float
) -> None:
    holder = Renewing(Lease.acquire(store, "fleet", "r1", ttl_s=TTL))
    time.sleep(0.3)
    holder.kill()
    skew[0] = behind
    started = time.monotonic()
    second = Lease.acquire(store, "fleet", "r2", ttl_s=TTL, wait_s=0)
    waited = time.monotonic() - started
    # At least its TTL, never the 120 s the skewed wall clocks made it (no upper timing bound:
    # a busy machine may take longer to schedule the challenger).
    assert waited >= TTL, waited
    assert second.doc.generation == holder.lease.doc.generation + 1
    # The stale holder's next write, fenced by the lease's etag, fails.
    with pytest.raises(ConflictError, match="lost the lease"):
        holder.lease.renew(force=True)
    second.release()
    assert Lease.acquire(store, "fleet", "r3", ttl_s=TTL).doc.rollout == "r3"  # released: at once


def test_a_lease_that_names_a_huge_ttl_is_watched_for_a_bounded_time(store: LocalStore) -> None:
    from cloud_sync import lease as lease_module

    doc = LeaseDoc(holder="h", rollout="r0", prefix="fleet", ttl_s=1e12)
    store.create(lease_key("fleet"), doc.model_dump_json().encode())
    lease_module.MAX_WATCH_S, saved = 0.5, lease_module.MAX_WATCH_S
    try:
        taken = Lease.acquire(store, "fleet", "r1", ttl_s=TTL)
    finally:
        lease_module.MAX_WATCH_S = saved
    assert taken.doc.generation == 2


def test_other_fleets_are_independent_and_an_unreadable_lease_protects_nothing(
    store: LocalStore,
) -> None:
    one = Lease.acquire(store, "fleet", "r1", ttl_s=TTL)
    other = Lease.acquire(store, "elsewhere", "r2", ttl_s=TTL)
    assert other.key != one.key
    _, etag = store.read(one.key)
    store.replace(one.key, b"not json", etag)
    assert Lease.acquire(store, "fleet", "r3", ttl_s=TTL).doc.rollout == "r3"
