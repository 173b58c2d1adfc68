"""Issue 19, finding 4: a writer to the bucket without the signing key edits what the controller
reads back (the rollout's state, its waves, a group), and the controller refuses to act on it.
Through the real CLI, a simulated fleet (``edgebento simulate``) and a real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.integration.test_rollout_sim import base, devices
from tests.support.agent import make_pack
from tests.support.services import Mosquitto
from tests.support.sim import publish_v1_v2, versions, wait_for

pytestmark = pytest.mark.slow

FAST = ["--bake", "0", "--wave-timeout", "10", "--waves", "1", "--canary", "50"]


def _edit(store_url: str, key: str, change: object) -> None:
    store = open_store(store_url)
    doc = json.loads(store.get_bytes(key))
    change(doc)  # type: ignore[operator]
    store.put_bytes(key, json.dumps(doc).encode())


def test_a_bucket_writer_cannot_make_resume_sign_a_downgrade(
    simulate, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, mlp_model: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store_url = str(tmp_path / "store")
    publish_v1_v2(store_url, tmp_path, mlp_model, keys[0])
    Registry(open_store(store_url)).publish(
        make_pack(tmp_path / "v3", mlp_model, keys[0], 3), key=keys[0]
    )
    fleet = simulate(4)
    args = [*base(store_url, broker, topic_prefix, keys[0]), "--allow-unverified"]
    flags = ["--devices", devices(fleet), *FAST]
    assert main(["rollout", "tiny", "2", *args, *flags]) == 0
    capsys.readouterr()
    assert main(["rollout", "tiny", "3", *args, *flags]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "completed" and shown["version"] == 3
    wait_for(broker, topic_prefix, dict.fromkeys(fleet.names, 3))
    rollout = shown["id"]

    # The attack: the finished v2 -> v3 rollout is made to look like an abort whose
    # devices ran v1 before; a resume would sign rollbacks to v1 for every device.
    waves = open_store(store_url).list(f"rollouts/{rollout}/")
    assert len(waves) == 2
    for key in waves:
        _edit(store_url, key, lambda doc: [d.update(previous={"name": "tiny", "version": 1})
                                           for d in doc["devices"]])  # fmt: skip
    _edit(store_url, f"rollouts/{rollout}.json", lambda doc: doc.update(phase="aborting"))
    assert main(["rollout", "resume", rollout, *args, "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "was changed after the controller signed it" in lines[0], err
    assert f"rollouts/{rollout}.json" in lines[0]
    assert set(versions(broker, topic_prefix, fleet.names).values()) == {3}

    # The header alone restored to its signed bytes: the edited wave files still stop it.
    store = open_store(store_url)
    _edit(store_url, f"rollouts/{rollout}.json", lambda doc: doc.update(phase="completed"))
    assert main(["rollout", "resume", rollout, *args, "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "wave-" in err and "changed after" in err, err
    # A wave document with no signature at all (written before, or by someone without the key).
    unsigned = json.loads(store.get_bytes(waves[0]))
    unsigned.pop("signature")
    store.put_bytes(waves[0], json.dumps(unsigned).encode())
    assert main(["rollout", "status", rollout, "--store", store_url, "--key", str(keys[0])]) == 1
    assert "not signed by the controller's key" in capsys.readouterr().err
    assert set(versions(broker, topic_prefix, fleet.names).values()) == {3}


def test_a_group_changed_in_the_bucket_is_refused(
    simulate, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, mlp_model: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store_url = str(tmp_path / "store")
    publish_v1_v2(store_url, tmp_path, mlp_model, keys[0])
    members, outsider = simulate(2), simulate(1, 2)
    signed = ("--store", store_url, "--key", str(keys[0]))
    assert main(["fleet", "group", "add", "lobby", *members.names, *signed]) == 0
    capsys.readouterr()
    key = "fleet/groups/lobby.json"
    _edit(store_url, key, lambda doc: doc["devices"].append(outsider.names[0]))
    args = [*base(store_url, broker, topic_prefix, keys[0]), "--allow-unverified"]
    assert main(["rollout", "tiny", "2", *args, "--group", "lobby", *FAST]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "changed after" in lines[0], err
    # An unsigned group (fleet group add without --key) is a cohort, never a rollout's target.
    assert main(["fleet", "group", "add", "dock", *members.names, "--store", store_url]) == 0
    assert main(["rollout", "tiny", "2", *args, "--group", "dock", *FAST]) == 1
    assert "not signed by the controller's key" in capsys.readouterr().err
    everyone = [*members.names, *outsider.names]
    assert set(versions(broker, topic_prefix, everyone).values()) == {1}
    # Signed again by the key, the group rolls out to exactly its members.
    assert main(["fleet", "group", "remove", "lobby", outsider.names[0], *signed]) == 0
    assert main(["rollout", "tiny", "2", *args, "--group", "lobby", *FAST]) == 0
    wait_for(broker, topic_prefix, {**dict.fromkeys(members.names, 2), outsider.names[0]: 1})
