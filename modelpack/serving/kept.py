"""A cache of what clients send over and over (a flood's few heads, timeouts, refusals), whose
size no client can grow: emptied when it holds its limit, then filled again by what recurs."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(store: dict[K, V], key: K, value: V, limit: int) -> V:
    """``value``, put in ``store`` under ``key``; ``store`` emptied first when it holds
    ``limit`` entries."""
    if len(store) >= limit:
        store.clear()
    store[key] = value
    return value
