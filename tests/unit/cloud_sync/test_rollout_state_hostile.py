"""Rollout documents in the store that a bucket writer changed, and rollout flags that would void
the lease: refused one by one (a bad document never hides the other rollouts), through
``edgebento rollout`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.rollout_state import Thresholds, new_rollout
from cloud_sync.rollout_store import load_state, save_state
from cloud_sync.store import LocalStore
from modelpack.errors import StoreError


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    devices = [f"d{i}" for i in range(10)]
    state = new_rollout("tiny", 2, devices, {}, Thresholds(canary_pct=10, waves=2), "p")
    save_state(store, state, Ed25519PrivateKey.generate())
    return store


def _id(store: LocalStore) -> str:
    headers = [k for k in store.list("rollouts/") if k.count("/") == 1 and "tiny" in k]
    return headers[0].removeprefix("rollouts/").removesuffix(".json")


def test_one_bad_header_does_not_hide_the_other_rollouts(store: LocalStore) -> None:
    store.put_bytes("rollouts/broken.json", b"{not json")
    done = _cli("list", "--store", str(store.root))
    assert done.returncode == 0, done.stderr
    assert _id(store)[:12] in done.stdout
    assert "skipped rollout broken" in done.stderr


def test_a_header_copied_under_another_id_is_refused(store: LocalStore) -> None:
    store.put_bytes("rollouts/copy.json", store.get_bytes(f"rollouts/{_id(store)}.json"))
    with pytest.raises(StoreError, match="names itself"):
        load_state(store, "copy")
    done = _cli("status", "copy", "--store", str(store.root))
    assert done.returncode == 1 and done.stderr.startswith("error:"), done.stderr


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda doc: doc["devices"][0].update(wave=-1), "a device of another wave"),
        (lambda doc: doc["devices"][0].update(wave=2), "a device of another wave"),
        (lambda doc: doc["devices"].append(dict(doc["devices"][0])), "listed twice"),
    ],
)
def test_a_wave_document_that_lies_about_its_devices_is_refused(
    store: LocalStore, change: object, says: str
) -> None:
    key = f"rollouts/{_id(store)}/wave-1.json"
    doc = json.loads(store.get_bytes(key))
    change(doc)  # type: ignore[operator]
    store.put_bytes(key, json.dumps(doc).encode())
    with pytest.raises(StoreError, match=says):
        load_state(store, _id(store))
    done = _cli("status", _id(store), "--store", str(store.root))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--lease-ttl", "0"], "--lease-ttl must be at least 1s"),  # excluded no second controller
        (["--lease-ttl", "-3"], "--lease-ttl must be at least 1s"),
        (["--lease-ttl", "nan"], "--lease-ttl must be at least 1s"),
        (["--timeout", "-1"], "--timeout must be positive"),
    ],
)
def test_a_lease_or_timeout_that_cannot_hold_is_refused_before_connecting(
    tmp_path: Path, keys: tuple[Path, Path], flags: list[str], says: str
) -> None:
    done = _cli(
        *("tiny", "2", "--store", str(tmp_path), "--broker", "mqtt://127.0.0.1:1"),
        *("--key", str(keys[0]), "--devices", "a", *flags),
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line == f"error: {says}" or line.startswith(f"error: {says}"), done.stderr


def test_a_lease_that_expires_when_taken_is_refused(tmp_path: Path) -> None:
    from cloud_sync.lease import Lease
    from modelpack.errors import ConfigError

    for ttl in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="positive time to live"):
            Lease.acquire(LocalStore(tmp_path), "fleet", "r1", ttl_s=ttl)


@pytest.mark.parametrize("device", ["+", "#", "a/b", "-x", "x" * 65])
def test_a_device_id_that_is_not_one_topic_level_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: str
) -> None:
    done = _cli(
        *("tiny", "2", "--store", str(tmp_path), "--broker", "mqtt://127.0.0.1:1"),
        *("--key", str(keys[0]), f"--devices=ok,{device}"),
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: device id {device!r} must be"), done.stderr
