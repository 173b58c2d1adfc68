"""Publishing several packs at once from separate registries, as separate publishers would."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from cloud_sync.registry import PackEntry, Registry
from modelpack.errors import VersionError


def publish_concurrently(
    open_registry: Callable[[], Registry], packs: list[Path], key: Path
) -> tuple[list[PackEntry], list[VersionError]]:
    """Publish every pack from its own thread and registry at once: (winners, refusals)."""
    barrier = threading.Barrier(len(packs))
    won: list[PackEntry] = []
    refused: list[VersionError] = []

    def publish(pack: Path) -> None:
        registry = open_registry()
        barrier.wait()
        try:
            won.append(registry.publish(pack, key=key))
        except VersionError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=publish, args=(p,)) for p in packs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused
