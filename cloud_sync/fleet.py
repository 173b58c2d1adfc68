"""Fleet status: one summary per device from retained status and desired state, the telemetry
heard while listening, and (with a store) the latest telemetry object each device left there."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from cloud_sync.fleet_metrics import DeviceSummary, FleetView
from cloud_sync.parts import TELEMETRY_ROOT, decode_jsonl_gz, parse_range
from cloud_sync.protocol import Topics
from cloud_sync.store import ObjectStore
from cloud_sync.watch import FleetWatch


def latest_parts(
    store: ObjectStore, boots: dict[str, str | None], per_device: int = 10, day: str | None = None
) -> dict[str, list[str]]:
    """Per device, the keys of its newest telemetry objects of ``day`` (default today, UTC),
    oldest first: of the boot its status names when known (seqs restart at every boot)."""
    day = day or datetime.now(UTC).strftime("%Y-%m-%d")
    found: dict[str, list[tuple[int, str]]] = {}
    for key in store.list(f"{TELEMETRY_ROOT}/date={day}/"):
        span = parse_range(key)
        device = key.split("/")[2].removeprefix("device=")
        boot = boots.get(device)
        if span is None or (boot and f"/part-{boot}-" not in key):
            continue
        found.setdefault(device, []).append((span[1], key))
    return {d: [k for _, k in sorted(parts)[-per_device:]] for d, parts in found.items()}


def fold_store(view: FleetView, store: ObjectStore, boots: dict[str, str | None]) -> None:
    for keys in latest_parts(store, boots).values():
        for key in keys:
            for record in decode_jsonl_gz(store.get_bytes(key)):
                view.on_record(record)


def fleet_status(
    broker_url: str,
    topics: Topics | None = None,
    *,
    listen_s: float = 2.0,
    store: ObjectStore | None = None,
) -> dict[str, DeviceSummary]:
    with FleetWatch(broker_url, topics or Topics()) as watch:
        if store is not None:
            boots = {d: s.boot_id for d, s in watch.statuses.items()}
            fold_store(watch.view, store, boots)
        time.sleep(listen_s)
        return watch.view.snapshot()
