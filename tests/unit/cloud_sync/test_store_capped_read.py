"""A capped read of the local store (``read``/``get_bytes`` with ``max_bytes``): the object
whole when it is within the cap, SizeLimitError past it, having read at most one byte more,
so that a sparse file of 64 GiB planted under a key costs its reader nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.store import LocalStore
from modelpack.errors import SizeLimitError


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(size=st.integers(0, 300), cap=st.integers(0, 300))
def test_within_the_cap_whole_past_it_refused(tmp_path: Path, size: int, cap: int) -> None:
    store = LocalStore(tmp_path)
    data = bytes(range(256)) * 2
    store.put_bytes("k", data[:size])
    if size <= cap:
        assert store.read("k", max_bytes=cap) == store.read("k")
        assert store.get_bytes("k", max_bytes=cap) == data[:size]
    else:
        with pytest.raises(SizeLimitError, match=f"over {cap} bytes"):
            store.read("k", max_bytes=cap)


def test_a_sparse_64_gib_object_is_refused_unread(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    path = tmp_path / "fleet" / "identity" / "devices" / "huge.json"
    path.parent.mkdir(parents=True)
    with path.open("wb") as fh:
        fh.truncate(64 << 30)  # no blocks on disk; a whole read would need 64 GiB of memory
    with pytest.raises(SizeLimitError):
        store.get_bytes("fleet/identity/devices/huge.json", max_bytes=64 << 10)
