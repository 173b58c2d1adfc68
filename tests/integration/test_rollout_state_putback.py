"""A whole older state of a rollout put back in the bucket (its header and its waves, each signed
by the controller's key, consistent among themselves), against moto's S3 server through real
boto3 calls and through the real CLI: the controller's record of the last save it wrote or
accepted, kept on its own machine (cloud_sync.rollout_record), makes a fresh load refuse it; a
newer header (a save by a controller on another machine) is accepted and moves the record on;
two stores holding the same rollout id keep their own records."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.protocol import ModelRef, Topics
from cloud_sync.rollout_plan import wait_quiet
from cloud_sync.rollout_record import SaveRecord
from cloud_sync.rollout_state import RolloutState, Thresholds, new_rollout
from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.s3store import S3Store
from cloud_sync.sealed import public_of
from cloud_sync.watch import FleetWatch
from modelpack.errors import StoreError
from modelpack.signing import load_private_key
from tests.integration import test_rollout_save_requests as save_requests
from tests.integration.test_rollout_wave_replay import _fresh, _get, _put_back
from tests.support.cli_run import run_cli
from tests.support.services import Mosquitto
from tests.unit.cloud_sync.test_rollout_save_format import SIGNER

TRUSTED = public_of(SIGNER)
store = save_requests.store  # the moto S3 server's bucket, through S3Store (boto3)


def _state(record: SaveRecord | None, prefix: str = "p", n: int = 40) -> RolloutState:
    devices = [f"sim-{i:05d}" for i in range(n)]
    previous = {d: ModelRef(name="tiny", version=1) for d in devices}
    thresholds = Thresholds(canary_pct=10, waves=3)
    return new_rollout("tiny", 2, devices, previous, thresholds, prefix, record=record)


def _snapshot(store: S3Store, state: RolloutState) -> dict[str, bytes]:
    """Every document of the rollout as the bucket holds it now: what a writer can put back."""
    keys = [rollout_key(state.id)] + [wave_key(state.id, i) for i in range(state.wave_count)]
    return {key: _get(store, key) for key in keys}


def _fail(state: RolloutState) -> str:
    device = state.wave(1)[0]
    state.move(device, "failed", "crashed on load")
    return device.device


def test_a_whole_older_state_put_back_is_refused_on_a_fresh_load(
    store: S3Store, tmp_path: Path
) -> None:
    record = SaveRecord.in_dir(tmp_path)
    state = _state(record)
    save_state(store, state, SIGNER)
    before = _snapshot(store, state)
    failed = _fail(state)
    save_state(store, state, SIGNER)
    assert record.recorded(store.url, state.id) == 2

    for key, data in before.items():
        _put_back(store, key, data)
    # Signed and consistent: the signatures and the header's record of its waves accept it.
    assert load_state(_fresh(store), state.id, TRUSTED).device(failed).state == "pending"
    with pytest.raises(StoreError) as refused:
        load_state(_fresh(store), state.id, TRUSTED, record)
    assert f"rollout {state.id} in {store.url}" in str(refused.value)
    assert "header is from save 1 but this controller last wrote or accepted save 2" in str(
        refused.value
    )
    assert record.recorded(store.url, state.id) == 2  # a refusal moves nothing


def test_a_newer_header_from_another_machine_is_accepted_and_moves_the_record_on(
    store: S3Store, tmp_path: Path
) -> None:
    here, there = SaveRecord.in_dir(tmp_path / "here"), SaveRecord.in_dir(tmp_path / "there")
    state = _state(here)
    save_state(store, state, SIGNER)
    save_state(store, state, SIGNER)
    at_two = _snapshot(store, state)
    # The fleet taken over from another machine (first sight there), which saves on.
    other = load_state(_fresh(store), state.id, TRUSTED, there)
    failed = _fail(other)
    save_state(_fresh(store), other, SIGNER)
    save_state(_fresh(store), other, SIGNER)
    assert (here.recorded(store.url, state.id), there.recorded(store.url, state.id)) == (2, 4)

    resumed = load_state(_fresh(store), state.id, TRUSTED, here)  # newer than here's record
    assert resumed.device(failed).state == "failed" and resumed.save_seq == 4
    assert here.recorded(store.url, state.id) == 4
    for key, data in at_two.items():
        _put_back(store, key, data)
    for record in (here, there):
        with pytest.raises(StoreError, match=r"from save 2 but .* save 4 .*older state put back"):
            load_state(_fresh(store), state.id, TRUSTED, record)


def test_two_stores_holding_the_same_rollout_id_keep_their_own_records(
    store: S3Store, tmp_path: Path
) -> None:
    record = SaveRecord.in_dir(tmp_path)
    state = _state(record)
    for _ in range(3):
        save_state(store, state, SIGNER)
    twin = _state(record)
    twin.id = state.id  # the same id in another prefix of the bucket: another fleet
    other = S3Store(store.bucket, "q", endpoint_url=store.client.meta.endpoint_url)
    save_state(other, twin, SIGNER)
    assert load_state(other, state.id, TRUSTED, record).save_seq == 1
    assert load_state(_fresh(store), state.id, TRUSTED, record).save_seq == 3
    assert (record.recorded(other.url, state.id), record.recorded(store.url, state.id)) == (1, 3)


def test_the_cli_refuses_a_whole_older_state_put_back_and_publishes_nothing(
    store: S3Store,
    tmp_path: Path,
    keys: tuple[Path, Path],
    broker: Mosquitto,
    topic_prefix: str,
) -> None:
    signer, state_dir = load_private_key(keys[0]), tmp_path / "controller"
    state = _state(SaveRecord.in_dir(state_dir), prefix=topic_prefix, n=8)
    save_state(store, state, signer)
    before = _snapshot(store, state)
    _fail(state)
    save_state(store, state, signer)
    after = _snapshot(store, state)
    where = ["--store", store.url, "--endpoint-url", store.client.meta.endpoint_url]
    signed = [*where, "--key", str(keys[0]), "--state-dir", str(state_dir)]

    for key, data in before.items():
        _put_back(store, key, data)
    status = run_cli("rollout", "status", state.id, *signed, "--json")
    resume = run_cli("rollout", "resume", state.id, *signed, "--broker", broker.url)
    for done in (status, resume):
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr
        assert state.id in errors[0], errors
        assert (
            "header is from save 1 but this controller last wrote or accepted save 2" in (errors[0])
        )
        assert done.stdout == ""
    devices = {d.device for d in state.devices}
    with FleetWatch(broker.url, Topics(topic_prefix), devices).start(settle_s=0) as watch:
        wait_quiet(watch)
        assert watch.desired == {}  # no device was told anything

    # The state the controller last saved, back in place: status --key shows it.
    for key, data in after.items():
        _put_back(store, key, data)
    shown = run_cli("rollout", "status", state.id, *signed, "--json")
    assert shown.returncode == 0 and '"save_seq": 2' in shown.stdout, shown.stderr
