"""How rollouts ended, as ``edgebento sync`` exports it from the store: terminal phases only,
final ones read once, a bad header skipped, old outcomes left out."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest

from cloud_sync.fleet_metrics import RolloutOutcomes
from cloud_sync.rollout_state import Thresholds, new_rollout
from cloud_sync.rollout_store import rollout_key, save_state
from cloud_sync.store import open_store


def _rollout(store: object, version: int, phase: str) -> str:
    state = new_rollout("digits", version, ["a", "b"], {}, Thresholds(), "edgebento")
    state.phase = phase  # type: ignore[assignment]
    save_state(store, state, Ed25519PrivateKey.generate())  # type: ignore[arg-type]
    return state.id


def _exported(outcomes: RolloutOutcomes) -> dict[str, str]:
    registry = CollectorRegistry()
    registry.register(outcomes)
    text = generate_latest(registry).decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("edgebento_rollout_ended_timestamp_seconds{"):
            labels = dict(
                p.split("=") for p in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            found[labels["rollout"].strip('"')] = labels["phase"].strip('"')
    return found


def test_only_ended_rollouts_are_exported_and_final_ones_are_read_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    aborted = _rollout(store, 3, "aborted")
    unverified = _rollout(store, 4, "unverified")
    _rollout(store, 5, "running")
    _rollout(store, 6, "aborting")
    (tmp_path / "store" / "rollouts" / "broken.json").write_text("{not json")
    outcomes = RolloutOutcomes(store, refresh_s=0.0)
    assert _exported(outcomes) == {aborted: "aborted", unverified: "unverified"}
    # A final header is not read again; one that may be resumed is.
    store.put_bytes(rollout_key(aborted), b"{}")
    header = store.get_bytes(rollout_key(unverified)).replace(b'"unverified"', b'"timed_out"')
    store.put_bytes(rollout_key(unverified), header)
    assert _exported(outcomes) == {aborted: "aborted", unverified: "timed_out"}


def test_outcomes_older_than_recent_s_are_left_out(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    _rollout(store, 3, "aborted")
    assert _exported(RolloutOutcomes(store, recent_s=-1.0)) == {}
